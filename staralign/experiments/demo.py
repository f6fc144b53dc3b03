"""``staralign demo``: the project's main job on a fresh machine, end to end, on a CPU.

1. measure this machine: a few faces drawn and a few training steps of the ``tiny`` preset
   timed, so that the data and the epochs are sized to the time budget on *this* machine,
   idle or busy (:func:`plan_demo`);
2. draw a small synthetic face dataset (98-point WFLW layout, exact labels);
3. train the ``tiny`` preset on it within what is left of the budget; a budget that ends
   mid-epoch still ends with a validated, saved model (the trainer validates at the stop);
4. evaluate the best checkpoint (the last weights when there is no best) on the test faces and
   write a report (metrics JSON, CED plot, per-landmark errors, worst faces, and the first
   faces in ``predictions.png``: ground truth vs prediction);
5. compare with the mean-shape baseline (every test face predicted as the average training
   shape), so the number means something, and say plainly when the model did not beat it.

Everything lands in one folder: ``data/``, ``run/`` (the training run), ``report/``,
``train_config.yaml`` and the marker ``.staralign-demo`` that names them.  A second demo
into the same folder removes exactly those (and nothing else) and starts clean; a folder
with other content and no marker is refused, never mixed into.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import draw_faces, tiny_config

EVAL_RESERVE_MINUTES = 1.0  # the least kept for evaluation and the report (the early refusal)
MIN_TRAIN_MINUTES = 0.5  # less than this left for training is an error (checked before drawing anything)
MIN_TRAIN_STOP_MINUTES = 0.05  # the least training budget given, so that there is a model to report
GRID_FACES = 16  # the first test faces drawn in predictions.png
MARKER = ".staralign-demo"  # names what a demo made in its folder, so a re-run removes only that
MADE = ("data", "run", "report", "train_config.yaml", ".probe")  # what a demo writes in its folder
DEFAULT_TRAIN = 1500  # training faces when the budget allows (the README's figure)
MIN_TRAIN = 320  # the fewest training faces the plan shrinks to (20 batches of 16)
MIN_TEST = 100  # the fewest test faces the plan shrinks to
LOADER_OVERHEAD = 1.15  # a real step also waits for the loader and writes logs (measured ~1.1)
REPORT_SECONDS = 20.0  # loading the model, plots and files after the evaluation itself
PROBE_FACES = 24  # faces drawn to time drawing
PROBE_STEPS = 2  # training steps timed (after one warm-up step)
PROBE_BATCH = 8  # faces per timed step (the time is scaled to the preset's batch): a cheap probe


@dataclass
class Measurement:
    """Seconds per unit of work on this machine, now (the probe)."""

    draw_face: float  # drawing one synthetic face, one process
    train_step: float  # one training step of the preset's batch
    eval_face: float  # one face through the model in evaluation
    threads: int = 0  # torch threads used (0: not set)


@dataclass
class Plan:
    """How much data and how many epochs fit the budget (all seconds are estimates)."""

    train: int
    test: int
    epochs: int
    milestones: list[int]
    steps_per_epoch: int
    estimate: dict[str, float] = field(default_factory=dict)
    shrunk: str = ""  # why the plan is smaller than asked ("" when it is not)


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
    partial_steps: int = 0  # steps of an epoch cut short by the budget (0: none)
    steps_per_epoch: int = 0
    weights: str = "best.safetensors"

    @property
    def beat_baseline(self) -> bool:
        return math.isfinite(self.nme) and self.nme < self.baseline_nme

    def trained(self) -> str:
        """``trained 1 epoch``, ``trained 3 epochs and 40 of 93 steps of epoch 4``."""
        if not self.partial_steps:
            return f"trained {_plural(self.epochs, 'epoch')}"
        part = f"{self.partial_steps} of {self.steps_per_epoch} steps of epoch {self.epochs + 1}"
        return f"trained {_plural(self.epochs, 'epoch')} and {part}" if self.epochs else f"trained {part}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "nme": self.nme, "fr": self.fr, "auc": self.auc, "threshold": self.threshold,
            "mean_shape_baseline_nme": self.baseline_nme, "beat_baseline": self.beat_baseline,
            "epochs": self.epochs, "partial_epoch_steps": self.partial_steps,
            "steps_per_epoch": self.steps_per_epoch, "weights": self.weights,
            "stopped_early": self.stopped_early, "seconds": self.seconds, "out_dir": str(self.out_dir),
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- the plan


def plan_demo(available_s: float, m: Measurement, train: int | None, test: int, epochs: int,
              milestones: list[int], batch_size: int) -> Plan:
    """Size the data and epochs so that drawing, training (validation included) and the final
    evaluation fit ``available_s`` seconds at the measured pace.

    The preset's schedule (``epochs``) is kept, with the training set shrunk (to ``MIN_TRAIN``
    at the least, the test set with it down to ``MIN_TEST``) until it fits; an explicit ``train``
    is never shrunk.  When even that does not fit, fewer epochs (the milestones scaled with
    them), down to one; the trainer's own budget stops it mid-epoch if the machine slows further.
    """
    def steps(n: int) -> int:
        return max(1, n // batch_size)

    def cost(n: int, t: int, e: int) -> dict[str, float]:
        draw = (n + t) * m.draw_face
        epoch = steps(n) * m.train_step * LOADER_OVERHEAD + 2 * t * m.eval_face  # model and EMA validated
        final = t * m.eval_face + REPORT_SECONDS
        return {"draw": draw, "epoch": epoch, "train": e * epoch, "evaluate": final,
                "total": draw + e * epoch + final}

    asked_train = train if train is not None else DEFAULT_TRAIN
    n, t, e, shrunk = asked_train, test, epochs, ""
    if cost(n, t, e)["total"] > available_s and train is None:
        lo = min(MIN_TRAIN, asked_train)
        def test_for(k: int) -> int:
            return min(test, max(MIN_TEST, round(k * test / max(asked_train, 1))))
        # the largest training set (multiple of the batch) whose plan fits
        n = lo
        for k in range(asked_train, lo - 1, -batch_size):
            if cost(k, test_for(k), e)["total"] <= available_s:
                n = k
                break
        t = test_for(n)
        shrunk = f"{n} training faces instead of {asked_train}"
    if cost(n, t, e)["total"] > available_s:
        c = cost(n, t, 0)
        fit = int((available_s - c["total"]) // cost(n, t, 1)["epoch"])
        e = max(1, min(epochs, fit))
        if e < epochs:
            shrunk = ", ".join(filter(None, [shrunk, f"{_plural(e, 'epoch')} instead of {epochs}"]))
    scaled = sorted({max(1, round(ms * e / epochs)) for ms in milestones if ms < epochs}) if e < epochs \
        else list(milestones)
    return Plan(n, t, e, scaled, steps(n), cost(n, t, e), shrunk)


def thread_candidates(default: int, load: float, cores: int) -> list[int]:
    """Torch thread counts the probe times on a machine with ``load`` (1-minute load average)
    on ``cores``; the faster one is used.  One thread always; torch's own count too while the
    load leaves a core's worth of room, since the load average lags (it still counts the
    ``pip install`` that ``make demo`` ran a moment before).  On a machine kept busy the
    larger count is not tried at all: measured here, a step of the tiny preset took 41 s with
    2 threads and 2.5 s with 1 while other work kept the 2-core VM at load 16."""
    return [1] if default <= 1 or load > cores - 0.5 else [1, default]


def machine_load() -> tuple[float, int]:
    """(1-minute load average, usable cores)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cores
    except OSError:
        return 0.0, cores


def measure_machine(config, device: str, workdir: Path, clock: Callable[[], float] = time.monotonic,
                    threads: Sequence[int] = ()) -> Measurement:
    """Time drawing ``PROBE_FACES`` faces and ``PROBE_STEPS`` training steps of ``config``'s model
    (after a warm-up step; ``PROBE_BATCH`` faces a step, scaled to the preset's batch) on random
    crops, with targets built as the loader builds them.  With several torch ``threads`` counts,
    the steps are timed at each and the fastest count is kept (set, and in the result)."""
    import torch

    from ..data.synth import generate_dataset
    from ..data.targets import batch_targets
    from ..data.transforms import normalize_points
    from ..definitions import get_definition
    from ..devices import resolve_device
    from ..engine.ema import ModelEMA
    from ..engine.step import build_optimizer, needs_target_maps, train_step
    from ..losses.recipe import RecipeLoss
    from ..models import build_model
    from .common import IMAGE_SIZE

    t = clock()
    with tempfile.TemporaryDirectory(dir=workdir) as probe:
        generate_dataset(probe, train=PROBE_FACES, test=0, size=IMAGE_SIZE, workers=1)
    draw_face = (clock() - t) / PROBE_FACES

    dev = resolve_device(device)
    definition = get_definition(config.model.definition)
    model = build_model(config.model, definition).to(dev)
    criterion = RecipeLoss(config.loss)
    optimizer = build_optimizer(model, config.optim)
    ema = ModelEMA(model, 0.99) if config.optim.ema else None
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    gen = torch.Generator().manual_seed(0)
    b, size, hsize = min(PROBE_BATCH, config.optim.batch_size), config.model.input_size, config.model.heatmap_size
    images = torch.randn(b, 3, size, size, generator=gen).to(dev)
    base = torch.rand(definition.num_points, 2, generator=gen) * 0.5 + 0.25
    points = ((base + 0.02 * torch.randn(b, definition.num_points, 2, generator=gen)) * size).to(dev)
    landmarks = normalize_points(points, size)

    def step() -> None:
        maps = (batch_targets({"points": points}, definition, size, hsize, dev) if needs_target_maps(config)
                else (None, None))
        train_step(model, model, criterion, optimizer, scaler, ema, images, landmarks, *maps,
                   grad_clip=config.optim.grad_clip)

    def seconds_per_step(count: int) -> float:
        torch.set_num_threads(count)
        step()  # warm-up: allocations, first-call costs (at this thread count)
        t = clock()
        for _ in range(PROBE_STEPS):
            step()
        return (clock() - t) / PROBE_STEPS

    model.train()
    timed = {n: seconds_per_step(n) for n in (threads or [torch.get_num_threads()])}
    fastest = min(timed, key=timed.__getitem__)
    torch.set_num_threads(fastest)
    train_s = timed[fastest] * config.optim.batch_size / b
    model.eval()
    t = clock()
    with torch.no_grad():
        model(images)
    eval_face = (clock() - t) / b
    return Measurement(draw_face, train_s, eval_face, torch.get_num_threads())


# --------------------------------------------------------------------------- the folder


def prepare_out(out: Path) -> list[str]:
    """Make ``out`` ready for a new demo: a previous demo's own files (named by its marker) are
    removed, anything else is left; a non-empty folder without the marker is refused.
    Returns what was removed."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return []
    marker = out / MARKER
    # A demo from before the marker is recognised by its own report and data set.
    older = (out / "report" / "demo.json").is_file() and (out / "data" / "synth.yaml").is_file()
    if not marker.is_file() and not older:
        raise ValueError(f"--out {out} is not empty and was not made by staralign demo (no {MARKER} in it): "
                         "give a new or empty folder; nothing was changed")
    removed = []
    for name in MADE:  # only the demo's own names, whatever the marker says
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    marker.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- the demo


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


def pick_weights(run_dir: Path, why: str = "") -> Path:
    """The best checkpoint, or the last weights when there is no best (no validation improved on
    infinity, e.g. a non-finite NME); an error saying what to do when there are neither."""
    for name in ("best.safetensors", "last.safetensors"):
        if (run_dir / name).exists():
            return run_dir / name
    raise ValueError(f"training in {run_dir} saved no weights ({why or 'no step ran'}): give more --minutes")


def verdict(demo: DemoResult, minutes: float, needed: float | None = None) -> str:
    """One plain sentence on whether the model learnt anything, and what to do if not.
    ``needed``: minutes the full demo (the default data and epochs) would take at the measured pace."""
    if demo.beat_baseline:
        return (f"The model beats the mean-shape baseline: NME {100 * demo.nme:.2f}% against "
                f"{100 * demo.baseline_nme:.2f}%.")
    more = max(2 * minutes, minutes + 5, math.ceil(needed or 0))
    return (f"The model did NOT beat the mean-shape baseline (NME {100 * demo.nme:.2f}% against "
            f"{100 * demo.baseline_nme:.2f}% for predicting the average face): it {demo.trained()}, too little "
            "training at this machine's present speed. Give it more time: staralign demo --minutes "
            f"{more:g}" + (f" (the full demo needs about {math.ceil(needed)} min at the pace measured)"
                           if needed else "") + ", or run it when the machine is less busy.")


def run_demo(
    out_dir: str | Path,
    minutes: float = 10.0,
    train: int | None = None,
    test: int = 200,
    seed: int = 0,
    device: str = "auto",
    workers: int = 1,
    quiet: bool = False,
    overrides: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """The whole demo; returns the headline numbers (also written to ``report/demo.json``).

    ``train`` None: as many training faces as the budget allows, up to ``DEFAULT_TRAIN``.
    ``overrides`` (nested TrainConfig fields) change the training set-up, e.g. for tests; they
    win over the plan.
    """
    from ..progress import format_duration

    t0 = clock()
    budget_s = minutes * 60

    def say(msg: str) -> None:
        if not quiet:
            print(f"{msg}  [{format_duration(clock() - t0)} of {format_duration(budget_s)}]", flush=True)

    if minutes - EVAL_RESERVE_MINUTES <= MIN_TRAIN_MINUTES:  # before drawing anything
        raise ValueError(f"--minutes {minutes:g} leaves no time to train: give more than "
                         f"{EVAL_RESERVE_MINUTES + MIN_TRAIN_MINUTES:g} (plus the time to draw the data)")
    out = Path(out_dir)
    removed = prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    from .._io import atomic_write

    atomic_write(out / MARKER, json.dumps({"made_by": "staralign demo", "entries": list(MADE)}) + "\n")
    if removed:
        say(f"removed the previous demo's {', '.join(removed)} from {out}")

    import torch

    threads_before = torch.get_num_threads()
    try:
        return _run(out, minutes, train, test, seed, device, workers, quiet, overrides, clock, say, t0)
    finally:
        torch.set_num_threads(threads_before)


def _run(out: Path, minutes: float, train: int | None, test: int, seed: int, device: str, workers: int,
         quiet: bool, overrides: dict[str, Any] | None, clock: Callable[[], float], say: Callable[[str], None],
         t0: float) -> DemoResult:
    """``run_demo`` once the folder is ready (torch's thread count is restored by the caller)."""
    import torch

    from ..config import save_yaml
    from ..data.testsets import load_test_set
    from ..devices import resolve_device
    from ..engine.evaluator import evaluate_model
    from ..engine.report import build_summary, format_table, write_face_grid, write_json, write_report
    from ..engine.trainer import train as train_run
    from ..models import load_model

    budget_s = minutes * 60
    data_dir, run_dir, report_dir = out / "data", out / "run", out / "report"
    seconds: dict[str, float] = {}
    load, cores = machine_load()
    candidates = thread_candidates(torch.get_num_threads(), load, cores)
    say(f"[1/5] measuring this machine (load {load:.1f} on {cores} cores; a few faces drawn, a few training "
        f"steps with {' and '.join(map(str, candidates))} torch thread{'s' if candidates != [1] else ''})")
    base_config = tiny_config(data_dir, workers, device, seed, overrides)
    probe_dir = out / ".probe"
    probe_dir.mkdir(exist_ok=True)
    try:
        measured = measure_machine(base_config, device, probe_dir, clock, candidates)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    seconds["measure"] = clock() - t0
    plan = plan_demo(budget_s - seconds["measure"], measured, train, test, base_config.optim.epochs,
                     list(base_config.optim.milestones), base_config.optim.batch_size)
    full = plan_demo(math.inf, measured, train, test, base_config.optim.epochs,
                     list(base_config.optim.milestones), base_config.optim.batch_size)
    needed = (full.estimate["total"] + seconds["measure"]) / 60
    say(f"      {measured.train_step:.2f} s per training step ({_plural(measured.threads, 'torch thread')}), "
        f"{1000 * measured.draw_face:.0f} ms per face drawn: "
        f"planned {plan.train} training faces, {plan.test} test faces, {_plural(plan.epochs, 'epoch')} "
        f"(about {plan.estimate['total'] / 60:.1f} min)" + (f"; smaller than the default to fit: {plan.shrunk}"
                                                           if plan.shrunk else "")
        + ("; even that overruns the budget on this machine now, so training will stop where the budget "
           "ends (validated and saved there)" if plan.estimate["total"] > budget_s - seconds["measure"] else ""))

    say(f"[2/5] drawing {plan.train} training and {plan.test} test faces into {data_dir}")
    t1 = clock()
    draw_faces(data_dir, plan.train, plan.test, 0.0, seed, workers, quiet)
    seconds["data"] = clock() - t1

    reserve = max(plan.estimate["evaluate"] + 2 * plan.test * measured.eval_face, EVAL_RESERVE_MINUTES * 60 / 2)
    train_budget = (budget_s - (clock() - t0) - reserve) / 60
    if train_budget < MIN_TRAIN_STOP_MINUTES:  # a model to report matters more than the last seconds
        say(f"      the budget is all but spent on this machine now: training at least one step (this overruns "
            f"--minutes {minutes:g}; give more --minutes)")
        train_budget = MIN_TRAIN_STOP_MINUTES
    config = tiny_config(data_dir, workers, device, seed, {
        "optim": {"epochs": plan.epochs, "milestones": plan.milestones},
        "runtime": {"time_budget_minutes": round(train_budget, 3)}}, overrides)
    save_yaml(config, out / "train_config.yaml")
    say(f"[3/5] training the tiny preset ({config.model.nstack} stacks, {config.model.channels} channels, "
        f"{config.model.input_size} px) for at most {_plural(config.optim.epochs, 'epoch')} or "
        f"{train_budget:.1f} min")
    t2 = clock()
    result = train_run(config, run_dir)
    seconds["train"] = clock() - t2

    weights = pick_weights(run_dir, result.stopped_early)
    say(f"[4/5] evaluating {weights.name} on the {plan.test} test faces")
    t3 = clock()
    dev = resolve_device(device)
    model = load_model(weights, map_location=dev)
    test_set = load_test_set(model.definition, data_dir, data_dir)
    thresholds = [model.definition.fr_auc_threshold]
    evaluation = evaluate_model(model, test_set, device=dev, label="tiny", checkpoint=str(weights),
                                progress=not quiet)
    baseline = mean_shape_nme(data_dir / "train.tsv", evaluation.predictions.gt, model.definition,
                              model.config.input_size)
    summary = build_summary([evaluation], test_set, thresholds, extra={"mean_shape_baseline": {
        "nme": float(baseline.mean()), "description": "every test face predicted as the mean training shape"}})
    say("[5/5] writing the report")
    write_report([evaluation], test_set, report_dir, summary)
    first = np.arange(min(GRID_FACES, len(test_set)))
    write_face_grid(evaluation, test_set, report_dir / "predictions.png", first)
    seconds["evaluate"] = clock() - t3
    seconds["total"] = clock() - t0
    run = summary["runs"]["tiny"]
    last = result.history[-1] if result.history else {}
    partial = int(last.get("partial_steps", 0))
    full_epochs = result.epochs_done - (1 if partial else 0)
    demo = DemoResult(out, run["nme"], run["fr"], run["auc"], float(baseline.mean()), thresholds[0],
                      full_epochs, result.stopped_early, seconds, partial, plan.steps_per_epoch, weights.name)
    write_json(report_dir / "demo.json", {**demo.to_dict(), "verdict": verdict(demo, minutes, needed),
                                          "minutes": minutes, "plan": asdict(plan), "measured": asdict(measured),
                                          "train": {"best_epoch": result.best_epoch,
                                                    "best_source": result.best_source,
                                                    "history": result.history}})

    say("report written to " + str(report_dir))
    if not quiet:
        print(format_table(summary))
        print(f"\nNME {100 * demo.nme:.2f}%  FR@{demo.threshold:g} {100 * demo.fr:.2f}%  AUC@{demo.threshold:g} "
              f"{demo.auc:.4f}   (mean-shape baseline NME {100 * demo.baseline_nme:.2f}%)")
        print(demo.trained() + (f" ({demo.stopped_early})" if demo.stopped_early else "")
              + f"; total {seconds['total'] / 60:.1f} min of {minutes:g}. "
              f"Files: {json.dumps(sorted(p.name for p in report_dir.iterdir()))}")
        print(verdict(demo, minutes, needed), flush=True)
    return demo
