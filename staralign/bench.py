"""Benchmarks: ``staralign bench {loss,infer,data,train,detect} ... --json``.

Each benchmark prints one JSON object (one line with ``--json``) naming the
device, so figures can be compared only where the machine is the same.  Timing
uses CUDA events on GPUs and ``perf_counter`` on CPUs, after warm-up, and
reports the median and spread of repeated runs.

Benchmarks register in ``BENCHES``: name -> (add_arguments, run), where ``run``
takes the parsed arguments and returns the result dict.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from .config import AMP_MODES
from .timing import device_info, resolve_device, time_fn

BENCHES: dict[str, tuple[Callable, Callable]] = {}


def bench(name: str, add_arguments: Callable):
    """Decorator registering ``run(args) -> dict`` as ``staralign bench NAME``."""

    def deco(run: Callable) -> Callable:
        BENCHES[name] = (add_arguments, run)
        return run

    return deco


# --------------------------------------------------------------------------- helpers


def profile_kernels(fn: Callable[[], Any], device, steps: int = 5, top: int = 15) -> dict:
    """Wall time per call of ``fn`` against the device's busy time (the sum of its kernels'
    durations, from the profiler), and the kernels that take the most.  Wall time well above
    kernel time means the device waits for the host to issue work (launch-bound).  On a CPU
    there are no kernels to count and only the wall time is given."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    result: dict[str, Any] = {"steps": steps, "wall_ms_per_step": (time.perf_counter() - t0) * 1000 / steps,
                              "kernel_ms_per_step": None, "kernels_per_step": None, "top_kernels": []}
    if not cuda:
        return result
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync()
    # Device events only, less the ranges that annotate a span of kernels (such as the
    # optimiser's "Optimizer.step#Adam.step"), which would count those kernels twice.
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False) and "#" not in e.name:
            entry = totals.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time / 1000 / steps
            entry[1] += 1
    result["kernel_ms_per_step"] = sum(v[0] for v in totals.values())
    result["kernels_per_step"] = sum(v[1] for v in totals.values()) / steps
    result["top_kernels"] = [{"name": k[:90], "ms_per_step": round(v[0], 3), "calls_per_step": v[1] / steps}
                             for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]
    return result


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
    else:
        print(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- loss


def _loss_args(p) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="faces per batch")
    p.add_argument("--points", type=int, default=98, help="landmarks per face (heatmaps per face)")
    p.add_argument("--size", type=int, default=64, help="heatmap side")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the heatmaps and the loss")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (the median is reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (fuses its small kernels)")
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
    loss_fn = torch.compile(STARLoss()) if args.compile else STARLoss()

    def step(fn):
        def run():
            heat.grad = None
            fn(heat, gt).backward()

        return run

    result: dict[str, Any] = {"bench": "loss", "shape": list(shape), "dtype": args.dtype, "compile": args.compile}
    result.update(device_info(device))
    result["staralign"] = time_fn(step(loss_fn), device, iters=args.iters)
    if not args.no_baseline and args.dtype == "float32":
        result["reference_style"] = time_fn(step(_reference_style_star), device, iters=args.iters)
        result["speedup_vs_reference_style"] = (
            result["reference_style"]["ms_median"] / result["staralign"]["ms_median"]
        )
    return result


# --------------------------------------------------------------------------- infer


def _infer_args(p) -> None:
    p.add_argument("--batch-size", type=int, default=1, help="faces per forward pass")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--cuda-graphs", action="store_true", help="capture and replay a CUDA graph")
    p.add_argument("--nstack", type=int, default=4, help="hourglass stacks of the network")
    p.add_argument("--nlevels", type=int, default=4, help="depth of each hourglass")
    p.add_argument("--channels", type=int, default=256, help="feature channels of the network")
    p.add_argument("--input-size", type=int, default=256, help="side of the input crop, pixels")
    p.add_argument("--points", type=int, default=98,
                   help="landmarks: 98/68/29 use WFLW/300W/COFW, others a synthetic definition")
    p.add_argument("--no-aam", action="store_true", help="without point/edge heads")
    p.add_argument("--no-coord", action="store_true", help="without CoordConv")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median and spread reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="time this model file (.pkl, .safetensors or .onnx, int8 included) at batch 1 and "
                        "--batch-size instead of a random network")
    p.add_argument("--stacks", type=int, default=None, metavar="K",
                   help="early exit: run only the first K stacks (PyTorch; an .onnx file has its own)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow --weights that need full unpickling (trusted files only)")


def _bench_definition(num_points: int):
    """A built-in definition with this many points, else one open edge through all of them."""
    from .definitions import DefinitionError, LandmarkDefinition, definition_for_num_points

    try:
        return definition_for_num_points(num_points)
    except DefinitionError:
        if num_points < 2:
            raise SystemExit("staralign bench infer: --points must be at least 2") from None
        return LandmarkDefinition.from_dict({
            "name": f"synthetic{num_points}",
            "num_points": num_points,
            "edges": [{"closed": False, "indices": list(range(num_points))}],
            "nme_default": {"left": 0, "right": num_points - 1},
        })


@bench("infer", _infer_args)
def bench_infer(args) -> dict:
    """Inference latency of the network (random weights or --weights FILE), with optional speed paths."""
    import copy

    import torch

    if args.weights:
        from .bench_weights import bench_weights

        return bench_weights(args)

    from .config import ConfigError, ModelConfig, to_dict
    from .models import build_model
    from .models.speed import make_inference_fn, max_landmark_difference

    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("staralign bench infer: --cuda-graphs needs --device cuda")
    definition = _bench_definition(args.points)
    config = ModelConfig(
        definition=definition.name, nstack=args.nstack, nlevels=args.nlevels,
        channels=args.channels, input_size=args.input_size,
        use_aam=not args.no_aam, add_coord=not args.no_coord,
    )
    try:
        torch.manual_seed(0)
        model = build_model(config, definition).to(device).eval()
        model.check_stacks(args.stacks)
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"staralign bench infer: {exc}") from None
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.input_size, args.input_size)
    images = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    speed_paths = {
        "channels_last": args.channels_last, "amp": args.amp,
        "compile": args.compile, "cuda_graphs": args.cuda_graphs,
    }
    uses_speed_path = any(speed_paths.values())

    result: dict[str, Any] = {
        "bench": "infer",
        "model": {**to_dict(config), "parameters": sum(p.numel() for p in model.parameters())},
        "input_shape": list(shape),
        "batch_size": args.batch_size,
        "options": speed_paths,
        "stacks": args.stacks,  # early exit (None: all stacks)
    }
    result.update(device_info(device))
    timing = {"iters": args.iters, "repeats": args.repeats, "warmup": args.warmup}

    with torch.inference_mode():
        if uses_speed_path:
            # The fp32 eager baseline on the same input, before channels_last mutates a copy.
            reference = model
            eager = time_fn(lambda: reference(images, all_stacks=False, stacks=args.stacks), device, **timing)
            model = copy.deepcopy(reference)
        t0 = time.perf_counter()
        fn = make_inference_fn(
            model, channels_last=args.channels_last, amp=args.amp, compile=args.compile,
            cuda_graphs=args.cuda_graphs, example=images, stacks=args.stacks,
        )
        fn(images)  # first call: compilation / capture
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup_s = time.perf_counter() - t0
        latency = time_fn(lambda: fn(images), device, **timing)
        result["latency_ms"] = {k: latency[k] for k in ("ms_median", "ms_min", "ms_max")}
        result["timing"] = timing
        result["images_per_s"] = args.batch_size * 1000.0 / latency["ms_median"]
        result["setup_s"] = setup_s
        if uses_speed_path:
            result["max_abs_landmark_diff"] = max_landmark_difference(fn, reference, images, stacks=args.stacks)
            result["eager_fp32_latency_ms"] = {k: eager[k] for k in ("ms_median", "ms_min", "ms_max")}
            result["speedup_vs_eager_fp32"] = eager["ms_median"] / latency["ms_median"]
        else:
            result["max_abs_landmark_diff"] = None  # this run *is* the fp32 eager model
    return result


# --------------------------------------------------------------------------- data


def _data_args(p) -> None:
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--images", type=int, default=64, help="JPEG images generated")
    p.add_argument("--size", type=int, default=512, help="side of the generated images")
    p.add_argument("--definition", default="WFLW", help="landmark definition")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    p.add_argument("--samples", type=int, default=None,
                   help="samples timed per mode (default: 4 x images, at least 8 batches)")
    p.add_argument("--profile-samples", type=int, default=32,
                   help="samples timed stage by stage in this process (0 to skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")


def _template_landmarks(definition, rng, size: float):
    """Face-like landmarks for any definition: the longest open edge as a jaw-sized arc,
    the other edges as small arcs and ellipses laid out inside the face (so curve lengths
    and edge-map work are realistic), other points random inside the face."""
    import numpy as np

    pts = rng.uniform(0.3 * size, 0.7 * size, (definition.num_points, 2))
    edges = list(definition.edges)
    jaw = max((e for e in edges if not e.closed), key=lambda e: len(e.indices), default=None)
    small = [e for e in edges if e is not jaw]
    cols = max(1, int(np.ceil(np.sqrt(len(small)))))
    for e in edges:
        m = len(e.indices)
        if e is jaw:
            t = np.linspace(np.pi, 0.0, m)
            xy = np.stack([0.5 + 0.28 * np.cos(t), 0.45 + 0.3 * np.sin(t)], 1)
        else:
            r, c = divmod(small.index(e), cols)
            cx = 0.33 + 0.34 * c / max(cols - 1, 1)
            cy = 0.3 + 0.4 * r / max(cols - 1, 1)
            t = np.linspace(0.0, 2 * np.pi, m, endpoint=False) if e.closed else np.linspace(np.pi, 0.0, m)
            xy = np.stack([cx + 0.08 * np.cos(t), cy + 0.03 * np.sin(t)], 1)
        pts[list(e.indices)] = xy * size
    return (pts + rng.normal(0.0, 0.005 * size, pts.shape)).astype(np.float32)


def _write_bench_dataset(folder, definition, count: int, size: int, seed: int):
    """``count`` photo-like random JPEGs (smooth colour fields plus grain) and a train.tsv."""
    import cv2
    import numpy as np

    from .crop import box_to_crop
    from .data.annotations import Annotation, five_points_from_landmarks, write_annotations

    rng = np.random.default_rng(seed)
    anns = []
    for i in range(count):
        low = rng.integers(0, 256, (max(2, size // 16), max(2, size // 16), 3), dtype=np.uint8)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        img = np.clip(img + rng.normal(0.0, 8.0, img.shape), 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        cv2.imwrite(str(folder / name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        face = rng.uniform(0.45, 0.7) * size
        offset = rng.uniform(0.1 * size, size - face - 0.1 * size, 2)
        lm = _template_landmarks(definition, rng, face) + offset.astype(np.float32)
        (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
        five = five_points_from_landmarks(lm, definition.five_points) if definition.five_points else None
        scale, center = box_to_crop(float(x0), float(y0), float(x1), float(y1))  # the datasets' rule
        anns.append(Annotation(name, lm, scale, center, five))
    write_annotations(folder / "train.tsv", anns)
    return folder / "train.tsv"


def _cpu_seconds(who: int) -> float:
    import resource

    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _loader_rate(dataset, workers: int, batch_size: int, samples: int) -> dict[str, Any]:
    """Samples per second of a DataLoader over ``dataset`` after warm-up (worker start-up and
    one batch per worker are not timed).  OpenCV and torch run one thread per process, so
    each worker (or the main process, with 0 workers) is one core.

    Also reported: CPU seconds per sample (main process plus workers, warm-up included),
    which other processes competing for the cores do not inflate the way they do wall time.
    """
    import resource

    import cv2
    import torch
    from torch.utils.data import DataLoader

    from .data.dataset import collate_samples, worker_init_fn

    warm = max(1, workers) * batch_size
    order = [i % len(dataset) for i in range(warm + samples)]
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    # Set in this process before the workers fork: cv2.setNumThreads inside a forked
    # worker can deadlock (see staralign.data.dataset.worker_init_fn).
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                            collate_fn=collate_samples, worker_init_fn=worker_init_fn if workers else None)
        cpu_main, cpu_children = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
        seen, start, cpu_start = 0, None, 0.0
        for batch in loader:
            seen += batch["image"].shape[0]
            if start is None and seen >= warm:
                start, seen, cpu_start = time.perf_counter(), 0, _cpu_seconds(resource.RUSAGE_SELF)
        elapsed = time.perf_counter() - start
        del batch, loader  # workers exit and are reaped: their CPU time is counted
        if workers:
            cpu = (_cpu_seconds(resource.RUSAGE_SELF) - cpu_main
                   + _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_children)
            cpu_samples = warm + seen
        else:
            cpu, cpu_samples = _cpu_seconds(resource.RUSAGE_SELF) - cpu_start, seen
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    rate = seen / elapsed
    return {"samples": seen, "seconds": elapsed, "samples_per_s": rate,
            "samples_per_s_per_core": rate / max(1, workers),
            "cpu_ms_per_sample": 1000.0 * cpu / cpu_samples,
            "samples_per_cpu_s": cpu_samples / cpu if cpu > 0 else float("nan")}


def _stage_profile(dataset, count: int) -> dict[str, float]:
    """Milliseconds per sample of each stage of a worker-side train sample, in this process."""
    import cv2
    import numpy as np
    import torch

    from .data.dataset import sample_rng
    from .data.targets.edges import edge_maps
    from .data.targets.points import point_maps
    from .data.transforms import apply_texture, image_to_tensor, normalize_points, transform_points, warp_image

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    totals = dict.fromkeys(("decode", "geometry_warp", "texture", "to_tensor", "point_maps",
                            "edge_maps"), 0.0)
    try:
        for k in range(count):
            i = k % len(dataset)
            t0 = time.perf_counter()
            image = dataset.load_image(i)
            t1 = time.perf_counter()
            image_m, point_m, _, _ = dataset.geometry_of(i, image.shape[1])
            pts = transform_points(dataset.items[i].landmarks, point_m)
            crop = warp_image(image, image_m, dataset.input_size)
            t2 = time.perf_counter()
            crop = apply_texture(crop, sample_rng(dataset.seed, 0, i, stream=1), dataset.texture)
            t3 = time.perf_counter()
            image_to_tensor(crop)
            normalize_points(pts, dataset.input_size)
            t4 = time.perf_counter()
            point_maps(pts, dataset.input_size, dataset.heatmap_size)
            t5 = time.perf_counter()
            edge_maps(np.asarray(pts), dataset.definition, dataset.input_size, dataset.heatmap_size)
            t6 = time.perf_counter()
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
                totals[key] += dt
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    out = {k: v * 1000 / count for k, v in totals.items()}
    out["total"] = sum(out.values())
    return out


@bench("data", _data_args)
def bench_data(args) -> dict:
    """Train-mode data loading on generated JPEGs: samples/s and per core, worker vs device targets."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from .data.dataset import LandmarkDataset
    from .data.targets.edges import edge_maps_torch
    from .data.targets.points import point_maps_torch
    from .definitions import get_definition

    if args.images < 1 or args.workers < 0 or args.batch_size < 1:
        raise SystemExit("staralign bench data: --images and --batch-size must be >= 1, --workers >= 0")
    device = resolve_device(args.device)
    definition = get_definition(args.definition)
    samples = args.samples or max(4 * args.images, 8 * args.batch_size)
    result: dict[str, Any] = {
        "bench": "data", "definition": definition.name, "workers": args.workers, "images": args.images,
        "image_size": args.size, "batch_size": args.batch_size, "samples_timed": samples,
        "input_size": 256, "heatmap_size": 64, "mode": "train", "cpu_cores": os.cpu_count(),
    }
    result.update(device_info(torch.device("cpu")))
    result["threads_per_process"] = 1  # torch and OpenCV, in the loader and the profile
    with tempfile.TemporaryDirectory(prefix="staralign-bench-data-") as tmp:
        folder = Path(tmp)
        tsv = _write_bench_dataset(folder, definition, args.images, args.size, args.seed)
        # The trainer's three ways (data.targets): all maps in the workers (float images), edge
        # maps in the workers with 8-bit images ("mixed"), no maps in the workers (8-bit images).
        for mode, dtype, key in (("worker", "float32", "worker_targets"), ("mixed", "uint8", "mixed_targets"),
                                 ("device", "uint8", "device_targets")):
            ds = LandmarkDataset(tsv, folder, definition, train=True, seed=args.seed, targets=mode,
                                 image_dtype=dtype)
            result[key] = _loader_rate(ds, args.workers, args.batch_size, samples)
            sample = ds[0]
            result[key]["bytes_per_sample"] = sum(v.numel() * v.element_size() for v in sample.values()
                                                  if isinstance(v, torch.Tensor))
        if args.profile_samples > 0:
            ds = LandmarkDataset(tsv, folder, definition, train=True, seed=args.seed)
            result["profile_ms_per_sample"] = _stage_profile(ds, args.profile_samples)
        # The device-side targets themselves, for one batch on --device.
        rng = np.random.default_rng(args.seed)
        pts = torch.from_numpy(np.stack([_template_landmarks(definition, rng, 150.0) + 53.0
                                         for _ in range(args.batch_size)])).to(device)
        threads = torch.get_num_threads()
        if device.type == "cpu":  # one core, like the per-core loader figures
            torch.set_num_threads(1)
        try:
            timing = time_fn(lambda: (point_maps_torch(pts), edge_maps_torch(pts, definition)), device,
                             warmup=1, iters=3, repeats=3)
        finally:
            torch.set_num_threads(threads)
        result["device_targets_ms_per_batch"] = {
            "device": str(device), "threads": 1 if device.type == "cpu" else None,
            "edge_method": "numpy" if device.type == "cpu" else "torch", **timing}
    return result


# --------------------------------------------------------------------------- train


def _train_args(p) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="faces per training step")
    p.add_argument("--definition", default="WFLW", help="landmark definition (name or YAML/JSON file)")
    p.add_argument("--nstack", type=int, default=4, help="hourglass stacks of the network")
    p.add_argument("--nlevels", type=int, default=4, help="depth of each hourglass")
    p.add_argument("--channels", type=int, default=256, help="feature channels of the network")
    p.add_argument("--input-size", type=int, default=256, help="side of the input crop, pixels")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the network and the loss")
    p.add_argument("--cuda-graphs", action="store_true", help="the step captured as one CUDA graph, as the "
                   "trainer's --cuda-graphs runs it")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick the fastest kernels")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median and spread reported)")
    p.add_argument("--profile", action="store_true",
                   help="also profile a few steps: wall time against the device's kernel time, top kernels")
    p.add_argument("--targets", choices=("device", "worker"), default="device",
                   help="where point/edge map targets are built, in train's words: on the device every "
                        "step, or by the loader workers (here: once up front, so the step is timed alone)")
    p.add_argument("--original-style", action="store_true",
                   help="the original's costs: anomaly detection on, a Python loop per tensor for the EMA, "
                        "STAR's eigen-decomposition on the CPU (same network and maths)")


def _python_loop_ema(ema_model, model, decay: float) -> None:
    """The original's EMA update: one pair of kernels per tensor, driven from Python."""
    import torch

    with torch.no_grad():
        src = dict(model.named_parameters())
        for k, p in ema_model.named_parameters():
            p.data.mul_(decay).add_(src[k].data, alpha=1 - decay)
        src_b = dict(model.named_buffers())
        for k, b in ema_model.named_buffers():
            if b.is_floating_point():
                b.data.mul_(decay).add_(src_b[k].data, alpha=1 - decay)
            else:
                b.data.copy_(src_b[k].data)


@bench("train", _train_args)
def bench_train(args) -> dict:
    """Images/s of the trainer's own step (:func:`staralign.engine.step.train_step`: forward, recipe
    loss, backward, gradient clipping, the finiteness sync, Adam, EMA) on synthetic tensors."""
    import contextlib
    import copy

    import torch

    from .config import ConfigError, LossConfig, ModelConfig, OptimConfig, RuntimeConfig, TrainConfig
    from .data.targets import batch_targets
    from .data.transforms import normalize_points
    from .definitions import get_definition
    from .engine.step import build_train_step

    device = resolve_device(args.device)
    definition = get_definition(args.definition)
    if args.cuda_graphs and (args.original_style or device.type != "cuda"):
        raise SystemExit("--cuda-graphs needs --device cuda and does not go with --original-style")
    # The trainer's configuration of this step: the paper recipe's loss, Adam and gradient
    # clipping setting, its default EMA decay for this batch, and the speed switches asked for.
    config = TrainConfig(
        model=ModelConfig(definition=definition.name, nstack=args.nstack, nlevels=args.nlevels,
                          channels=args.channels, input_size=args.input_size),
        loss=LossConfig(), optim=OptimConfig(batch_size=args.batch_size),
        runtime=RuntimeConfig(amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                              cuda_graphs=args.cuda_graphs, cudnn_benchmark=args.cudnn_benchmark))
    try:
        config.runtime.validate()
    except ConfigError as exc:
        raise SystemExit(f"staralign bench train: {exc}") from None
    torch.manual_seed(0)
    step = build_train_step(config, definition, device)
    if args.original_style:

        class _CpuEighStar(torch.nn.Module):
            def forward(self, heatmaps, gt):
                return _reference_style_star(heatmaps, gt)

        class _PythonLoopEMA:
            def __init__(self, model, decay: float) -> None:
                self.module, self.decay = copy.deepcopy(model), decay

            def update(self, src) -> None:
                _python_loop_ema(self.module, src, self.decay)

        step.loss.landmark_loss = _CpuEighStar()  # before the first call: torch.compile traces it then
        step.ema = _PythonLoopEMA(step.model, step.ema.decay)

    gen = torch.Generator().manual_seed(0)
    b, size = args.batch_size, args.input_size
    images = torch.randn(b, 3, size, size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    # Plausible landmark layouts: a jittered mean shape per sample, in crop pixels.
    base = torch.rand(definition.num_points, 2, generator=gen) * 0.5 + 0.25
    points = ((base + 0.02 * torch.randn(b, definition.num_points, 2, generator=gen)) * size).to(device)
    batch = {"image": images, "landmarks": normalize_points(points, size), "points": points}
    if args.targets == "worker":  # the maps built once, as if a loader built them; "device": every step
        batch.update(zip(("pointmaps", "edgemaps"),
                         batch_targets(batch, definition, size, config.model.heatmap_size, device), strict=True))

    def run_step() -> None:
        # The original runs with anomaly detection on, forward and backward (set_detect_anomaly:
        # the same mode, restored on exit, without detect_anomaly's warning at every step).
        with torch.autograd.set_detect_anomaly(True) if args.original_style else contextlib.nullcontext():
            step(batch)

    step.net.train()
    if args.cuda_graphs:
        run_step()  # the first call captures the graph (untimed, like any warm-up)
    timing = time_fn(run_step, device, warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    result: dict[str, Any] = {
        "bench": "train",
        "batch_size": b,
        "model": {"nstack": args.nstack, "nlevels": args.nlevels, "channels": args.channels,
                  "input_size": size, "definition": definition.name},
        "options": {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
                    "cuda_graphs": args.cuda_graphs, "targets": args.targets,
                    "cudnn_benchmark": args.cudnn_benchmark, "original_style": args.original_style},
    }
    result.update(device_info(device))
    result["step"] = timing
    result["images_per_s"] = b * 1000.0 / timing["ms_median"]
    if args.profile:
        result["profile"] = profile_kernels(run_step, device)
    return result


# --------------------------------------------------------------------------- face detectors


def _detect_args(p) -> None:
    p.add_argument("--sizes", default="640x480,1920x1080", metavar="WxH,...",
                   help="image sizes to time (default 640x480,1920x1080)")
    p.add_argument("--detectors", default="yunet,opencv", metavar="NAME,...",
                   help="face detectors to time: yunet, yunet-no-roll-search, opencv (Haar)")
    p.add_argument("--yunet", metavar="FILE", help="YuNet ONNX file (default: the cached download)")
    p.add_argument("--yunet-max-side", type=int, default=1280, metavar="PX",
                   help="YuNet searches larger images reduced to this longer side; 0: whole (default 1280)")
    p.add_argument("--image", metavar="FILE",
                   help="photo to time, resized to each size (default: a synthetic face on a textured field)")
    p.add_argument("--iters", type=int, default=10, help="calls per timed run (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")


def _detect_scene(width: int, height: int, photo):
    """A BGR test image: ``photo`` resized, or a synthetic face (a third of the height) on smooth
    colour noise, so the detectors see one face and some texture."""
    import cv2
    import numpy as np

    if photo is not None:
        return cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    from .data.synth import render_face

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    scene = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    side = max(64, height // 3)
    face = render_face(np.random.default_rng(1), side)[0]
    y0, x0 = (height - side) // 2, (width - side) // 2
    scene[y0:y0 + side, x0:x0 + side] = face
    return scene


@bench("detect", _detect_args)
def bench_detect(args) -> dict:
    """Face detector time per image (YuNet, Haar) at a few image sizes, on the CPU."""
    import cv2

    from .cli import UserError
    from .inference.faces import FaceDetectorError, get_face_detector

    photo = None
    if args.image:
        photo = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if photo is None:
            raise UserError(f"{args.image}: not a readable image")
    sizes = []
    for text in args.sizes.split(","):
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise UserError(f"--sizes: {text!r} is not WIDTHxHEIGHT") from None
        sizes.append((w, h))
    detectors = {}
    for name in (n.strip() for n in args.detectors.split(",") if n.strip()):
        try:
            if name in ("yunet", "yunet-no-roll-search"):  # YuNet itself, never the Haar fallback
                from .inference.faces import ROLL_SEARCH_ANGLES, YuNetDetector

                detectors[name] = YuNetDetector(args.yunet, max_side=args.yunet_max_side or None,
                                                roll_search=ROLL_SEARCH_ANGLES if name == "yunet" else None)
            else:
                detectors[name] = get_face_detector(name)
        except FaceDetectorError as exc:
            raise UserError(str(exc)) from None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    result: dict[str, Any] = {
        "bench": "detect", "device": "cpu", "device_name": cpu, "cpu_count": os.cpu_count(),
        "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "image": args.image or "synthetic face on colour noise", "results": [],
    }
    for w, h in sizes:
        image = _detect_scene(w, h, photo)
        found = {name: det(image) for name, det in detectors.items()}  # warm-up (and the face count)
        samples: dict[str, list[float]] = {name: [] for name in detectors}
        for _ in range(max(1, args.repeats)):  # detectors interleaved: side by side under the same load
            for name, det in detectors.items():
                t0 = time.perf_counter()
                for _ in range(max(1, args.iters)):
                    det(image)
                samples[name].append((time.perf_counter() - t0) * 1000.0 / max(1, args.iters))
        for name, det in detectors.items():
            result["results"].append({
                "detector": name, "width": w, "height": h, "faces": len(found[name]),
                "searched_side": getattr(det, "max_side", None),
                "ms_median": round(statistics.median(samples[name]), 2),
                "ms_min": round(min(samples[name]), 2), "ms_max": round(max(samples[name]), 2)})
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


# --------------------------------------------------------------------------- video


def _video_args(p) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT", help="model to run (.safetensors, .pkl or .onnx)")
    p.add_argument("--frames", type=int, default=60, help="synthetic video frames (one moving face)")
    p.add_argument("--size", type=int, default=480, help="frame size in pixels (square)")
    p.add_argument("--detect-every", type=int, default=10, metavar="N", help="tracking: detector every N frames")
    p.add_argument("--detector", default="yunet", help="face detector (yunet, opencv, dlib, mediapipe)")
    p.add_argument("--smooth", default="ambiguity", help="temporal filter: none, oneeuro, ambiguity")
    p.add_argument("--repeats", type=int, default=2, help="passes per mode; the fastest counts")


@bench("video", _video_args)
def bench_video(args) -> dict:
    """Video frames per second: tracking (detector every N frames) vs the detector on every frame."""
    from .data.synth.sequence import synth_sequence
    from .inference.detector import LandmarkDetector
    from .inference.video import video_fps

    seq = synth_sequence(0, frames=args.frames, size=args.size)
    det = LandmarkDetector.from_checkpoint(args.weights, device=args.device, detector=args.detector)
    frames = list(seq.frames)
    video_fps(det, frames[:3], detect_every=1, smooth=args.smooth)  # warm-up
    every = video_fps(det, frames, seq.fps, 1, args.smooth, args.repeats)
    tracked = video_fps(det, frames, seq.fps, args.detect_every, args.smooth, args.repeats)
    return {"bench": "video", "device": device_info(resolve_device(args.device)), "detector": args.detector,
            "size": args.size, "detect_every_frame": every, "tracking": tracked,
            "speedup": round(tracked["fps"] / every["fps"], 3), "load_average": list(os.getloadavg())}


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    """Add ``bench`` and a sub-command per benchmark in ``BENCHES`` to the ``staralign`` parser."""
    from .cli import plain_doc

    p = sub.add_parser("bench", help="speed benchmarks (JSON output)",
                       description="Speed benchmarks: each prints what it measured, or one JSON line with "
                                   "--json, e.g. staralign bench infer --device cpu --json")
    bsub = p.add_subparsers(dest="bench_name", metavar="BENCH", required=True)
    for name, (add_arguments, run) in BENCHES.items():
        text = plain_doc(run.__doc__)
        bp = bsub.add_parser(name, help=text, description=text + ".")
        bp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
        bp.add_argument("--json", action="store_true", help="one JSON line on stdout")
        bp.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op CPU threads for torch and onnxruntime (default: the cores this process "
                             "may use, from its affinity and cgroup quota); recorded in the JSON")
        add_arguments(bp)
        bp.set_defaults(func=run_bench)


def run_bench(args) -> int:
    """``staralign bench NAME``: run the named benchmark and print its result."""
    _, run = BENCHES[args.bench_name]
    emit(_with_threads(run, args), args.json)
    return 0


def _with_threads(run: Callable, args) -> dict:
    """Resolve and apply the thread count before ``run``, and record it in its result."""
    import importlib.util

    from .threads import resolve_threads

    try:
        args.thread_choice = resolve_threads(args.threads)
    except ValueError as exc:
        raise SystemExit(f"staralign bench: --threads: {exc}") from None
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(args.thread_choice.threads)
    result = run(args)
    result["thread_settings"] = dict(args.thread_choice)
    return result
