"""``staralign experiment ambiguity``: does STAR suppress error along the ambiguous direction?

The paper's central claim: real annotations are uncertain *along* contours (where
on the jaw line is point 7?) much more than across them, and a loss that
measures error in the heatmap's own principal directions learns to be less
confused by that noise.  Synthetic faces let us test it with ground truth:

* one set of images; training labels moved along each contour's tangent by
  ``sigma`` x the inter-ocular distance (corners much less), test labels exact;
* identical small models trained with
  - ``star``: the paper's recipe (STAR v2 + AWing on point and edge maps),
  - ``aam``: the same recipe with STAR replaced by smooth-L1 on the soft-argmax
    coordinates (the AAM recipe without STAR),
  - ``l2``: plain L2 on the soft-argmax coordinates, no maps;
* each over several seeds; test errors of contour points split into the
  component along the exact contour tangent and the one across it.

The numbers are reported whichever way they come out.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.synth.geometry import KIND_CONTOUR, KIND_CORNER
from .common import IMAGE_SIZE, draw_faces, tiny_config

METHODS: dict[str, dict[str, Any]] = {
    "star": {"loss": {"kind": "star", "map_weight": 10.0}},
    "aam": {"loss": {"kind": "smoothl1", "map_weight": 10.0}},
    "l2": {"loss": {"kind": "l2", "map_weight": 0.0}},
}
METHOD_NOTES = {
    "star": "STAR v2 (w 1, smooth-L1) + AWing point/edge maps x10 (the paper's recipe)",
    "aam": "smooth-L1 on soft-argmax coordinates + AWing point/edge maps x10 (AAM recipe without STAR)",
    "l2": "L2 on soft-argmax coordinates only",
}


@dataclass
class RunErrors:
    """Test errors of one trained model, normalised by the inter-ocular distance."""

    method: str
    seed: int
    nme: float  # all points
    tangent: float  # mean |error . tangent| over contour points
    normal: float  # mean |error . normal| over contour points
    contour_nme: float  # mean |error| over contour points
    corner_nme: float  # mean |error| over corner/end points
    seconds: float  # wall time of this invocation's training and evaluation
    train_seconds: float = 0.0  # training time over all epochs, summed across resumes


def split_errors(
    pred: np.ndarray, gt: np.ndarray, tangents: np.ndarray, kinds: np.ndarray, iod: np.ndarray
) -> dict[str, float]:
    """Tangent/normal components of errors in image pixels, normalised per face.

    ``pred``/``gt``: (M, N, 2) image pixels; ``tangents``: (M, N, 2) unit vectors
    (zero where undefined); ``kinds``: (N,) ``KIND_CONTOUR``, ``KIND_CORNER`` or ``KIND_PUPIL``;
    ``iod``: (M,) normalising distance.
    """
    err = (pred - gt) / iod[:, None, None]
    normals = np.stack([-tangents[..., 1], tangents[..., 0]], axis=-1)
    along = np.abs((err * tangents).sum(-1))
    across = np.abs((err * normals).sum(-1))
    size = np.linalg.norm(err, axis=-1)
    contour = kinds == KIND_CONTOUR
    corner = kinds == KIND_CORNER
    return {
        "nme": float(size.mean()),
        "tangent": float(along[:, contour].mean()),
        "normal": float(across[:, contour].mean()),
        "contour_nme": float(size[:, contour].mean()),
        "corner_nme": float(size[:, corner].mean()),
    }


def _same_data(data: Path, want: dict[str, Any]) -> bool:
    """Whether ``data`` holds a finished synthetic dataset drawn with ``want``: its ``synth.yaml``
    (written last, removed when drawing starts) has those values."""
    import yaml

    path = data / "synth.yaml"
    if not path.exists():
        return False
    try:
        have = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:  # edited by hand into something else: draw the data again
        return False
    return isinstance(have, dict) and all(have.get(k) == v for k, v in want.items())


def _summarise(runs: list[RunErrors]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        rs = [r for r in runs if r.method == method]
        stats = {}
        for key in ("nme", "tangent", "normal", "contour_nme", "corner_nme"):
            v = np.array([getattr(r, key) for r in rs])
            stats[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        ratio = np.array([r.tangent / r.normal for r in rs])
        stats["tangent_over_normal"] = {"mean": float(ratio.mean()),
                                        "std": float(ratio.std(ddof=1)) if len(ratio) > 1 else 0.0}
        out[method] = stats
    return out


def format_results(summary: dict, seeds: int) -> str:
    """Markdown table: mean +- std over seeds, errors in % of the inter-ocular distance."""
    lines = [
        "| method | NME (all) | contour NME | tangent error | normal error | tangent / normal | corner NME |",
        "|---|---|---|---|---|---|---|",
    ]
    def cell(st: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
        return f"{scale * st[key]['mean']:.{digits}f} ± {scale * st[key]['std']:.{digits}f}"

    for method, st in summary.items():
        lines.append(f"| {method} | {cell(st, 'nme')} | {cell(st, 'contour_nme')} | {cell(st, 'tangent')} | "
                     f"{cell(st, 'normal')} | {cell(st, 'tangent_over_normal', 1.0)} | {cell(st, 'corner_nme')} |")
    lines.append(f"\nErrors in % of the inter-ocular distance (outer eye corners), mean ± sample std over "
                 f"{seeds} seed(s).")
    return "\n".join(lines)


def run_ambiguity_experiment(
    out_dir: str | Path,
    seeds: int = 3,
    sigma: float = 0.05,
    train: int = 1500,
    test: int = 300,
    epochs: int = 8,
    methods: tuple[str, ...] = tuple(METHODS),
    device: str = "auto",
    workers: int = 1,
    data_seed: int = 0,
    overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every (method, seed), evaluate on exact test labels, write ``results.json`` and ``results.md``.

    With ``resume``, an interrupted experiment continues: the data is reused when it was drawn with
    the same parameters, finished runs are only evaluated, and a partial run resumes from its
    last checkpoint (the trainer's own resume).
    """
    import torch

    from ..data.synth import GENERATOR_VERSION, point_kinds
    from ..data.testsets import load_test_set
    from ..definitions import get_definition
    from ..devices import resolve_device
    from ..engine.evaluator import evaluate_model
    from ..engine.trainer import train as train_run
    from ..metrics import normalising_distance
    from ..models import load_model

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    t0 = time.monotonic()
    out = Path(out_dir)
    data = out / "data"
    want = {"version": GENERATOR_VERSION, "train": train, "test": test, "ambiguity": float(sigma),
            "seed": data_seed, "size": IMAGE_SIZE}
    if resume and _same_data(data, want):
        say(f"reusing the synthetic data in {data}")
    else:
        say(f"drawing {train} training faces (label ambiguity sigma {sigma:g}) and {test} exact test faces")
        draw_faces(data, train, test, sigma, data_seed, workers, quiet)
    # The same test faces for every run: read once, with their exact tangents and normalising distance.
    dev = resolve_device(device)
    definition = get_definition("WFLW")  # the generator's layout
    test_set = load_test_set(definition, data, data)
    tangents = np.load(data / "test_tangents.npy").astype(np.float64)
    iod = normalising_distance(np.stack([a.landmarks for a in test_set.annotations]).astype(np.float64),
                               definition, "default")
    kinds = point_kinds(definition.num_points)

    runs: list[RunErrors] = []
    for seed in range(seeds):
        for method in methods:
            run_dir = out / "runs" / f"{method}_seed{seed}"
            config = tiny_config(data, workers, device, seed, {
                "optim": {"epochs": epochs}, "runtime": {"tensorboard": False}, **METHODS[method]}, overrides)
            t = time.monotonic()
            # A run killed before its first checkpoint resumes too: the trainer starts it afresh.
            if resume and (run_dir / "config.yaml").exists():
                say(f"resuming {method} (seed {seed}) in {run_dir}")
                trained = train_run(config, run_dir, resume=True)
            else:
                say(f"training {method} (seed {seed}) -> {run_dir}")
                trained = train_run(config, run_dir)
            # The last weights: every method gets the same schedule, no selection on the test set.
            model = load_model(run_dir / "last.safetensors", map_location=dev)
            res = evaluate_model(model, test_set, device=dev, space="image", label=method)
            faces = res.predictions.indices
            errs = split_errors(res.pred, res.gt, tangents[faces], kinds, iod[faces])
            # Training time over all epochs (validation included); the history survives resumes.
            train_seconds = sum(float(r.get("epoch_seconds", 0.0)) for r in trained.history)
            runs.append(RunErrors(method, seed, seconds=time.monotonic() - t, train_seconds=train_seconds, **errs))
            say(f"  NME {100 * errs['nme']:.2f}%, contour tangent {100 * errs['tangent']:.2f}% / "
                f"normal {100 * errs['normal']:.2f}%")

    summary = _summarise(runs)
    minutes = (time.monotonic() - t0) / 60
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, {dev}"
    train_minutes = sum(r.train_seconds for r in runs) / 60
    result = {
        "sigma": sigma, "train": train, "test": test, "epochs": epochs, "seeds": seeds,
        "methods": {m: METHOD_NOTES[m] for m in methods}, "summary": summary,
        "runs": [r.__dict__ for r in runs], "minutes": minutes, "train_minutes": train_minutes,
        "machine": machine,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    table = format_results(summary, seeds)
    footer = (f"\n\nWall time {minutes:.1f} min on {machine} "
              f"(training {train_minutes:.1f} min in all, over resumes).\n")
    (out / "results.md").write_text(table + footer, encoding="utf-8")
    say(table)
    return result
