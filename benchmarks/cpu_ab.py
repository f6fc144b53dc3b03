"""Side-by-side CPU inference paths at batch 1, interleaved so that load hits all of them.

Usage (from the repository root)::

    python benchmarks/cpu_ab.py --weights MODEL.safetensors --onnx fp32=A.onnx int8=B.onnx ... \
        [--rounds 5] [--iters 3] [--out result.json]
    python benchmarks/cpu_ab.py --make-onnx DIR [--spin] [--out result.json]

``--make-onnx DIR`` exports the model into DIR (once; later runs reuse the files)
as float32 (``fp32``), int8 with today's default operator set (``int8_body``: the
network body in int8, the soft-argmax tail float32) and the earlier default
(``int8_conv``: convolutions only), and times them with any ``--onnx`` files.
``--spin`` adds each ONNX file at the resolved thread count with onnxruntime's
spin-waiting on (its own default; staralign turns it off for shared machines):
on an idle machine it shows what spinning would buy.

Without ``--weights`` a randomly initialised paper-size network (4 stacks, 256
channels, 256 px, WFLW) is used.  The baseline is the original network's forward
as its demo runs it: PyTorch eager, float32, NCHW, PyTorch's default thread count
(``torch_fp32_original``).  Every round runs each path for ``--iters`` calls, one
path after the other, and records the load average; the ratio to the baseline is
taken within each round (the same load) and its median over rounds reported.
Each ONNX path runs as staralign runs it (:class:`OnnxBackend`: the thread count
it resolves, ``--threads`` overrides, no spin-waiting) and also on one thread;
PyTorch bf16 likewise.  Input: one synthetic face crop.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="a .safetensors/.pkl model (default: random paper-size network)")
    p.add_argument("--onnx", nargs="*", default=[], metavar="NAME=FILE", help="ONNX files to time")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="also time PyTorch bf16 autocast + channels-last")
    p.add_argument("--make-onnx", metavar="DIR", default=None,
                   help="export fp32, int8_body and int8_conv files of the model into DIR (reused if there)")
    p.add_argument("--calibration-crops", type=int, default=16,
                   help="synthetic calibration faces for --make-onnx's int8 files (speed does not depend on them)")
    p.add_argument("--spin", action="store_true", help="also time each ONNX file with spin-waiting threads")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    from staralign.bench_weights import network_gflop
    from staralign.config import ModelConfig
    from staralign.inference.onnx_backend import OnnxBackend
    from staralign.inference.quantize import synthetic_crops
    from staralign.models import build_model, load_model
    from staralign.models.speed import make_inference_fn
    from staralign.threads import resolve_threads

    default_threads = torch.get_num_threads()  # what the original demo gets
    choice = resolve_threads(args.threads)
    if args.weights:
        model = load_model(args.weights).float().eval()
    else:
        torch.manual_seed(0)
        model = build_model(ModelConfig(definition="WFLW", nstack=4, nlevels=4, channels=256,
                                        input_size=256)).eval()
    size = int(model.config.input_size)
    x_np, _ = synthetic_crops(1, size, seed=3)
    x = torch.from_numpy(x_np)
    gflop = network_gflop(model.config, model.definition)

    onnx_files = [spec.split("=", 1) for spec in args.onnx]
    if args.make_onnx:
        onnx_files = _make_onnx(model, Path(args.make_onnx), args.calibration_crops) + onnx_files

    paths: dict[str, tuple[int, object]] = {}  # name -> (torch threads or 0, callable)

    def torch_eager(threads):
        def run():
            with torch.inference_mode():
                model(x, all_stacks=False)
        return threads, run

    paths["torch_fp32_original"] = torch_eager(default_threads)
    paths["torch_fp32_1thread"] = torch_eager(1)
    if args.bf16:
        bf16_fn = make_inference_fn(copy.deepcopy(model), channels_last=True, amp="bf16")

        def bf16():
            with torch.inference_mode():
                bf16_fn(x)
        for t in sorted({choice.threads, 1}):
            paths[f"torch_bf16_cl_{t}thread"] = (t, bf16)
    gflops = {}
    for name, file in onnx_files:
        meta = json.loads(ort.InferenceSession(file, providers=["CPUExecutionProvider"])
                          .get_modelmeta().custom_metadata_map["staralign"])
        stacks = meta.get("stacks")
        runs = [(t, False) for t in sorted({choice.threads, 1})] + ([(choice.threads, True)] if args.spin else [])
        for t, spin in runs:
            backend = OnnxBackend(file, threads=t, spin=spin)  # staralign's session settings (no spinning)
            key = f"onnx_{name}_{t}thread{'_spinning' if spin else ''}"
            paths[key] = (0, lambda b=backend: b.run(x_np, ambiguity=False))
            gflops[key] = network_gflop(model.config, model.definition, stacks)

    for _, warm in paths.values():  # warm-up
        warm()
    samples: dict[str, list[float]] = {k: [] for k in paths}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, (threads, fn) in paths.items():
            torch.set_num_threads(threads or default_threads)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1000 / args.iters)
    base = samples["torch_fp32_original"]
    one = samples["torch_fp32_1thread"]
    out = {"machine": os.uname().nodename, "cpu_model": _cpu_model(), "onnxruntime": ort.__version__,
           "torch": torch.__version__, "cpus": choice, "torch_default_threads": default_threads,
           "onnx_files": {name: str(file) for name, file in onnx_files},
           "load_average_per_round": loads, "rounds": args.rounds, "iters": args.iters,
           "model": {"weights": args.weights or "random paper-size", "nstack": model.config.nstack,
                     "channels": model.config.channels, "input_size": size}, "paths": {}}
    for name, ms in samples.items():
        g = gflops.get(name, gflop)
        out["paths"][name] = {
            "ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms),
            "speedup_vs_original_median": statistics.median(b / m for b, m in zip(base, ms, strict=True)),
            "speedup_vs_torch_fp32_1thread_median": statistics.median(b / m for b, m in zip(one, ms, strict=True)),
            "ms_per_round": ms,
            "gflop_per_image": g, "gflop_per_s_at_min": g * 1000 / min(ms) if g else None}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def _make_onnx(model, folder: Path, crops: int) -> list[list[str]]:
    """fp32, int8_body and int8_conv exports of ``model`` in ``folder`` (made once, then reused)."""
    from staralign.inference.export import export_onnx
    from staralign.inference.quantize import quantize_onnx, synthetic_crops

    folder.mkdir(parents=True, exist_ok=True)
    size = int(model.config.input_size)
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        report = export_onnx(model, fp32)
        if not report.passed:
            raise SystemExit(f"{fp32}: onnxruntime differs from PyTorch by {report.max_difference:.2e}")
    files = [["fp32", str(fp32)]]
    for ops in ("body", "conv"):
        out = folder / f"int8_{ops}.onnx"
        if not out.exists():
            cal, _ = synthetic_crops(crops, size, seed=0)
            held, labels = synthetic_crops(8, size, seed=1)
            quantize_onnx(fp32, out, cal, held, labels=labels, ops=ops)
        files.append([f"int8_{ops}", str(out)])
    return files


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
