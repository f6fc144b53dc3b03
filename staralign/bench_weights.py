"""``staralign bench infer --weights FILE``: the latency of a real model file.

Why a separate path from the random-weights benchmark: an exported ``.onnx``
(float32 or int8) runs in onnxruntime, not PyTorch, and a trained ``.pkl`` /
``.safetensors`` has its own shape.  Both are timed on the same input -- one
synthetic face crop (:mod:`staralign.data.synth`), repeated to the batch -- at
batch 1 and at ``--batch-size``, with the JSON keys of ``bench infer``
(``latency_ms``, ``images_per_s``; the top-level ones are for ``--batch-size``,
``batch_1`` holds batch 1).  ``gflop_per_image`` counts the network's
multiply-adds (x2) with PyTorch's FLOP counter on the same configuration and
stacks, and ``gflop_per_s`` is what the run achieved.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from .timing import device_info, resolve_device, time_fn

__all__ = ["bench_weights", "network_gflop"]


def network_gflop(config: Any, definition: Any, stacks: int | None = None) -> float | None:
    """GFLOP of one forward at batch 1 (convolutions and matrix products, 2 per multiply-add)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    from .models import build_model

    model = build_model(config, definition).eval()
    size = int(config.input_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size), all_stacks=False, stacks=stacks)
    return counter.get_total_flops() / 1e9


def _face_batch(size: int, batch: int) -> np.ndarray:
    from .inference.quantize import synthetic_crops

    one, _ = synthetic_crops(1, size, seed=3)
    return np.ascontiguousarray(np.repeat(one, batch, axis=0))


def bench_weights(args) -> dict:
    """Time ``args.weights`` at batch 1 and ``args.batch_size`` on ``args.device``."""
    import torch

    from .cli import UserError
    from .config import ModelConfig, from_dict, to_dict
    from .hub import resolve_weights

    try:
        path = resolve_weights(args.weights)  # a file, or a published model's name (fetched once)
    except UserError as exc:
        raise SystemExit(f"staralign bench infer: --weights: {exc}") from None
    device = resolve_device(args.device)
    batches = sorted({1, int(args.batch_size)})
    timing = {"iters": args.iters, "repeats": args.repeats, "warmup": args.warmup}
    result: dict[str, Any] = {"bench": "infer", "weights": str(path)}
    runs: dict[int, dict] = {}
    if path.suffix.lower() == ".onnx":
        if args.amp or args.compile or args.cuda_graphs or args.channels_last:
            raise SystemExit("staralign bench infer: --amp, --compile, --cuda-graphs and --channels-last "
                             "apply to PyTorch weights, not to an .onnx file")
        from .inference.onnx_backend import OnnxBackend, OnnxModelError

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        try:
            backend = OnnxBackend(path, providers=providers, threads=args.thread_choice.threads)
        except OnnxModelError as exc:
            raise SystemExit(f"staralign bench infer: {exc}") from None
        if args.stacks is not None and backend.stacks is not None and args.stacks != backend.stacks:
            raise SystemExit(f"staralign bench infer: {path} was exported with {backend.stacks} stack(s); "
                             f"--stacks {args.stacks} needs another export")
        meta = backend._metadata()
        config = from_dict(ModelConfig, meta["config"], "config")
        size, definition, stacks = backend.input_size, backend.definition, backend.stacks
        quant = backend.quantization
        result.update({"runtime": "onnxruntime", "providers": backend.session.get_providers(),
                       "precision": "int8" if quant else "fp32", "quantization": quant,
                       "ort_threads": backend.threads, "ort_spinning": backend.spin})
        # session.run returns when the outputs are on the host: wall-clock timing is right on any provider.
        clock = torch.device("cpu")
        for b in batches:
            images = _face_batch(size, b)
            runs[b] = time_fn(lambda images=images: backend.run(images, ambiguity=False), clock, **timing)
    else:
        from .models import load_model
        from .models.speed import make_inference_fn, max_landmark_difference

        try:
            model = load_model(path, map_location="cpu", allow_pickle=args.allow_pickle)
            model.check_stacks(args.stacks)
        except ValueError as exc:
            raise SystemExit(f"staralign bench infer: {exc}") from None
        model = model.float().to(device).eval()
        config, definition, size, stacks = model.config, model.definition, int(model.config.input_size), args.stacks
        result.update({"runtime": "torch", "precision": args.amp or "fp32",
                       "options": {"channels_last": args.channels_last, "amp": args.amp, "compile": args.compile,
                                   "cuda_graphs": args.cuda_graphs}})
        with torch.inference_mode():
            for b in batches:
                images = torch.from_numpy(_face_batch(size, b)).to(device)
                t0 = time.perf_counter()
                fn = make_inference_fn(copy.deepcopy(model), channels_last=args.channels_last, amp=args.amp,
                                       compile=args.compile, cuda_graphs=args.cuda_graphs, example=images,
                                       stacks=stacks)
                fn(images)
                runs[b] = time_fn(lambda fn=fn, images=images: fn(images), device, **timing)
                runs[b]["setup_s"] = time.perf_counter() - t0
                if b == batches[-1] and (args.amp or args.channels_last or args.compile or args.cuda_graphs):
                    result["max_abs_landmark_diff"] = max_landmark_difference(fn, model, images, stacks=stacks)
    result["model"] = {**to_dict(config), "stacks_run": stacks or config.nstack}
    result.update(device_info(device))
    gflop = network_gflop(config, definition, stacks)
    result["gflop_per_image"] = gflop
    result["timing"] = timing

    def summary(b: int) -> dict:
        t = runs[b]
        out = {"batch_size": b, "latency_ms": {k: t[k] for k in ("ms_median", "ms_min", "ms_max")},
               "images_per_s": b * 1000.0 / t["ms_median"]}
        if gflop is not None:
            out["gflop_per_s"] = gflop * out["images_per_s"]
        return out

    result.update(summary(batches[-1]))
    result["batch_1"] = summary(1)
    return result
