"""``staralign demo``: the project's main job on a fresh machine, end to end, on a CPU.

1. draw a small synthetic face dataset (98-point WFLW layout, exact labels);
2. train the ``tiny`` preset on it within a time budget;
3. evaluate the best checkpoint on the test faces and write a report
   (metrics JSON, CED plot, per-landmark errors, worst faces, and the first
   faces in ``predictions.png``: ground truth vs prediction);
4. compare with the mean-shape baseline (every test face predicted as the
   average training shape), so the number means something.

Everything lands in one folder: ``data/``, ``run/`` (the training run) and
``report/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import draw_faces, tiny_config

EVAL_RESERVE_MINUTES = 1.0  # kept for evaluation and the report out of the time budget
MIN_TRAIN_MINUTES = 0.5  # less than this left for training is an error
GRID_FACES = 16  # the first test faces drawn in predictions.png


@dataclass
class DemoResult:
    out_dir: Path
    nme: float
    fr: float
    auc: float
    baseline_nme: float
    threshold: float
    epochs: int
    stopped_early: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nme": self.nme, "fr": self.fr, "auc": self.auc, "threshold": self.threshold,
            "mean_shape_baseline_nme": self.baseline_nme, "epochs": self.epochs,
            "stopped_early": self.stopped_early, "seconds": self.seconds, "out_dir": str(self.out_dir),
        }


def mean_shape_nme(train_tsv: Path, test_gt: np.ndarray, definition, input_size: int) -> np.ndarray:
    """Per-face NME of predicting the mean training shape (normalised crop coordinates).

    ``test_gt`` is (M, N, 2) in the normalised crop space the evaluator scores in.
    """
    from ..data.annotations import read_annotations
    from ..data.transforms import crop_matrix, normalize_points, transform_points
    from ..metrics import nme

    shapes = []
    for a in read_annotations(train_tsv, num_points=definition.num_points):
        m = crop_matrix(a.scale, a.center[0], a.center[1], input_size)
        shapes.append(normalize_points(transform_points(a.landmarks.astype(np.float64), m), input_size))
    mean = np.mean(shapes, axis=0)
    return nme(np.broadcast_to(mean, test_gt.shape), test_gt, definition)


def run_demo(
    out_dir: str | Path,
    minutes: float = 10.0,
    train: int = 1500,
    test: int = 200,
    seed: int = 0,
    device: str = "auto",
    workers: int = 1,
    quiet: bool = False,
    overrides: dict[str, Any] | None = None,
) -> DemoResult:
    """The whole demo; returns the headline numbers (also written to ``report/demo.json``).

    ``overrides`` (nested TrainConfig fields) change the training set-up, e.g. for tests.
    """

    from ..config import save_yaml
    from ..devices import resolve_device
    from ..engine.evaluator import evaluate_model, load_test_set
    from ..engine.report import build_summary, format_table, write_face_grid, write_json, write_report
    from ..engine.trainer import train as train_run
    from ..models import load_model

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    if minutes - EVAL_RESERVE_MINUTES <= MIN_TRAIN_MINUTES:  # before drawing anything
        raise ValueError(f"--minutes {minutes:g} leaves no time to train: give more than "
                         f"{EVAL_RESERVE_MINUTES + MIN_TRAIN_MINUTES:g} (plus the time to draw the data)")
    t0 = time.monotonic()
    out = Path(out_dir)
    data_dir, run_dir, report_dir = out / "data", out / "run", out / "report"
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    say(f"[1/4] drawing {train} training and {test} test faces into {data_dir}")
    draw_faces(data_dir, train, test, 0.0, seed, workers, quiet)
    seconds["data"] = time.monotonic() - t0

    budget = minutes - (time.monotonic() - t0) / 60 - EVAL_RESERVE_MINUTES
    if budget <= MIN_TRAIN_MINUTES:
        raise ValueError(f"--minutes {minutes:g} leaves no time to train after drawing the data")
    config = tiny_config(data_dir, workers, device, seed, {"runtime": {"time_budget_minutes": round(budget, 2)}},
                         overrides)
    save_yaml(config, out / "train_config.yaml")
    say(f"[2/4] training the tiny preset ({config.model.nstack} stacks, {config.model.channels} channels, "
        f"{config.model.input_size} px) for at most {config.optim.epochs} epochs or {budget:.1f} min")
    t1 = time.monotonic()
    result = train_run(config, run_dir)
    seconds["train"] = time.monotonic() - t1

    say("[3/4] evaluating the best checkpoint on the test faces")
    t2 = time.monotonic()
    dev = resolve_device(device)
    model = load_model(run_dir / "best.safetensors", map_location=dev)
    test_set = load_test_set(model.definition, data_dir, data_dir)
    thresholds = [model.definition.fr_auc_threshold]
    evaluation = evaluate_model(model, test_set, device=dev, label="tiny",
                                checkpoint=str(run_dir / "best.safetensors"))
    baseline = mean_shape_nme(data_dir / "train.tsv", evaluation.predictions.gt, model.definition,
                              model.config.input_size)
    summary = build_summary([evaluation], test_set, thresholds, extra={"mean_shape_baseline": {
        "nme": float(baseline.mean()), "description": "every test face predicted as the mean training shape"}})
    write_report([evaluation], test_set, report_dir, summary)
    first = np.arange(min(GRID_FACES, len(test_set)))
    write_face_grid(evaluation, test_set, report_dir / "predictions.png", first)
    seconds["evaluate"] = time.monotonic() - t2
    seconds["total"] = time.monotonic() - t0
    run = summary["runs"]["tiny"]
    demo = DemoResult(out, run["nme"], run["fr"], run["auc"], float(baseline.mean()), thresholds[0],
                      result.epochs_done, result.stopped_early, seconds)
    write_json(report_dir / "demo.json", {**demo.to_dict(), "train": {
        "best_epoch": result.best_epoch, "best_source": result.best_source, "history": result.history}})

    say("[4/4] report written to " + str(report_dir))
    say(format_table(summary))
    say(f"\nNME {100 * demo.nme:.2f}%  FR@{demo.threshold:g} {100 * demo.fr:.2f}%  AUC@{demo.threshold:g} "
        f"{demo.auc:.4f}   (mean-shape baseline NME {100 * demo.baseline_nme:.2f}%)")
    say(f"trained {demo.epochs} epochs" + (f" ({demo.stopped_early})" if demo.stopped_early else "")
        + f"; total {seconds['total'] / 60:.1f} min. Files: {json.dumps(sorted(p.name for p in report_dir.iterdir()))}")
    return demo
