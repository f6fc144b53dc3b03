"""Training: one function, ``train(config, run_dir)``, readable top to bottom.

The loop: for each batch of :mod:`.loaders`, one step (:mod:`.step`: targets,
forward, the recipe loss over all stacks, backward, a finiteness check, optimiser
step, EMA update).  Each epoch ends with the LR schedule, validation of the model
and its EMA (last stack's NME), and atomic checkpoints (:mod:`.state`).  The same
code runs on one CPU or, launched by ``torchrun``, on many GPUs.

Run directory::

    config.yaml         the resolved configuration (what was run)
    train.log           human log
    metrics.jsonl       one JSON object per log step and per epoch
    tb/                 TensorBoard event files (with the optional tensorboard extra)
    train_state.pt      everything needed to resume (``--resume RUN_DIR``)
    last.safetensors    weights after the last finished epoch (our model format)
    best.safetensors    weights with the best validation NME (model or EMA)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..config import RuntimeConfig, TrainConfig, save_yaml
from ..definitions import LandmarkDefinition, get_definition
from . import distributed
from .loaders import build_loaders, timed_batches
from .preflight import preflight
from .resume import absolute_paths, resume_config
from .rundir import RunLock, prepare_new_run, run_failure, start_run, truncate_metrics
from .state import RunProgress, restore_checkpoint, save_checkpoint
from .step import StepResult, TrainStep, build_train_step, current_lr

log = logging.getLogger("staralign.train")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the step was not applied."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_nme: float
    best_epoch: int
    best_source: str
    last_val: dict[str, float] = field(default_factory=dict)
    skipped_batches: int = 0
    stopped_early: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          overwrite: bool = False, saved: TrainConfig | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``run_dir``; returns a summary.

    A new run refuses a folder that holds one unless ``overwrite``; the folder is locked
    for the run's duration (:mod:`.rundir`); the data is checked before the first step
    (:mod:`.preflight`); a resume may change the settings :mod:`.resume` allows.  ``saved``:
    the run's ``config.yaml`` when the caller has read it already (else it is read here)."""
    run_dir = Path(run_dir)
    config, changes = _config_to_run(config, run_dir, resume, saved)
    env = distributed.setup(config.runtime.device)
    rt, oc = config.runtime, config.optim
    lock = RunLock(run_dir)
    anomaly_before = torch.is_anomaly_enabled()
    loaders = None
    try:
        definition, has_state = _set_up(config, run_dir, env, lock, resume, changes, overwrite)
        loaders = build_loaders(config, definition, env)
        step = build_train_step(config, definition, env.device, world_size=env.world_size,
                                distributed=env.distributed)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(step.optimizer, list(oc.milestones), oc.gamma)
        start_epoch, start_batch, progress = 0, 0, RunProgress()
        if has_state:
            start_epoch, start_batch, progress = restore_checkpoint(run_dir, step, scheduler, oc, env.device)
            log.info("resumed %s at epoch %d step %d", run_dir, start_epoch, start_batch)
        steps_per_epoch = loaders.sampler.batches_per_epoch()
        resumed_at = start_epoch * steps_per_epoch + start_batch if resume else None
        metrics = _open_metrics(run_dir, env, rt.tensorboard, resumed_at, steps_per_epoch)
        _log_start(definition, len(loaders.train_set), steps_per_epoch, env, step)
        budget, stopped = _TimeBudget(rt.time_budget_minutes), ""

        for epoch in range(start_epoch, oc.epochs):
            first = start_batch if epoch == start_epoch else 0
            loaders.start_epoch(epoch, skip_batches=first)
            step.net.train()
            tally = _EpochTally()
            bar = _progress(env.is_main, total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{oc.epochs}")
            i = first
            for i, batch in enumerate(timed_batches(loaders.train, tally.waited), start=first):
                result = step(batch)
                if not result.applied:
                    progress.skipped = _not_applied(result, batch, epoch, i, rt, progress.skipped)
                    continue
                tally.add(result.loss)
                if (i + 1) % rt.log_every == 0 or i + 1 == steps_per_epoch:
                    _log_step(metrics, bar, result, step, epoch, i, steps_per_epoch)
                bar.update(1)
                if rt.save_every_steps and (i + 1) % rt.save_every_steps == 0 and i + 1 < steps_per_epoch:
                    _checkpoint(run_dir, env, step, scheduler, progress, epoch, i + 1)
                if stopped := budget.spent():
                    break
            bar.close()
            # A budget that ends mid-epoch still ends with a validated, saved model: the partial
            # epoch is validated and saved like a full one, and the state resumes at this step.
            mid_epoch = bool(stopped) and i + 1 < steps_per_epoch
            tally.train_seconds = time.monotonic() - tally.started
            if not mid_epoch:
                scheduler.step()
            improved = _validate(step, loaders.val, definition, env, config, progress, metrics, tally, epoch,
                                 i + 1 if mid_epoch else None, steps_per_epoch)
            _save_weights(run_dir, env, step, progress.best, improved)
            if mid_epoch:
                _checkpoint(run_dir, env, step, scheduler, progress, epoch, i + 1)
                log.info("stopping: %s (mid-epoch %d: validated and saved at step %d of %d)", stopped,
                         epoch + 1, i + 1, steps_per_epoch)
                break
            _checkpoint(run_dir, env, step, scheduler, progress, epoch + 1, 0)
            if not stopped and epoch + 1 < oc.epochs:
                stopped = budget.another_epoch_overruns(epochs_done=epoch + 1 - start_epoch)
            if stopped:
                log.info("stopping: %s after epoch %d", stopped, epoch + 1)
                break

        metrics.close()
        return _result(run_dir, progress, start_epoch, stopped)
    except Exception as exc:  # errors a user can fix: one line (rundir.run_failure), not a traceback
        failure = run_failure(exc, run_dir)
        if failure is None:
            raise
        log.error("%s", failure)
        raise failure from exc
    finally:
        if loaders is not None:
            loaders.close()
        _close_logging()
        lock.release()
        torch.autograd.set_detect_anomaly(anomaly_before)
        distributed.teardown()


# --------------------------------------------------------------------------- set-up and resume


def _config_to_run(config: TrainConfig, run_dir: Path, resume: bool,
                   saved: TrainConfig | None) -> tuple[TrainConfig, list[str]]:
    """The configuration the run uses, validated, and the changes a resume makes to the saved one."""
    changes: list[str] = []
    if resume:
        # A run continues as it was configured: the saved configuration wins (before any set-up).
        from ..config import load_yaml

        if saved is None:
            saved = load_yaml(TrainConfig, run_dir / "config.yaml")
        config, changes, refused = resume_config(saved, config)
        if refused:
            warnings.warn(f"resuming {run_dir} with the configuration saved there; {', '.join(refused)} "
                          "differ(s) in the one passed in and is ignored", stacklevel=3)
    config = absolute_paths(config)
    config.validate()
    return config, changes


def _set_up(config: TrainConfig, run_dir: Path, env: distributed.DistEnv, lock: RunLock, resume: bool,
            changes: list[str], overwrite: bool) -> tuple[LandmarkDefinition, bool]:
    """Check the data, then take the folder (lock, clear or keep), start the log, seed torch and save
    the configuration.  Returns the landmark definition and whether there is a state to resume
    from (a run killed before its first checkpoint starts from scratch)."""
    definition = get_definition(config.model.definition)
    # The data first: a run that cannot start must not have cleared the folder it would use.
    checked = preflight(config, definition)
    if env.is_main:
        lock.acquire()
        if not resume:
            prepare_new_run(run_dir, overwrite)
    distributed.barrier()
    _setup_logging(run_dir, env.is_main)
    has_state = start_run(run_dir, lock, env.is_main, resume, changes)
    torch.manual_seed(config.runtime.seed)
    torch.autograd.set_detect_anomaly(config.runtime.detect_anomaly)  # restored by train(): no mode left behind
    log.info("%s", checked)
    if env.is_main and (not has_state or changes):
        save_yaml(config, run_dir / "config.yaml")
    return definition, has_state


def _close_logging() -> None:
    """Detach and close the run's log handlers: train.log is not held open after the run, and
    nothing logged later (another run, another command in the same process) lands in it."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    _close_logging()
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(sh)


def _log_start(definition: LandmarkDefinition, samples: int, steps_per_epoch: int, env: distributed.DistEnv,
               step: TrainStep) -> None:
    n_params = sum(p.numel() for p in step.model.parameters())
    log.info("training %s: %d samples, %d steps/epoch, %d processes on %s, %.2fM parameters",
             definition.name, samples, steps_per_epoch, env.world_size, env.device, n_params / 1e6)


# --------------------------------------------------------------------------- logging


def _open_metrics(run_dir: Path, env: distributed.DistEnv, tensorboard: bool, resumed_at: int | None,
                  steps_per_epoch: int) -> _Metrics:
    """metrics.jsonl (and TensorBoard) opened for appending; a resume first drops the records of the
    steps it will replay (``resumed_at``: the global step it continues from)."""
    if env.is_main and resumed_at is not None:
        truncate_metrics(run_dir, resumed_at, steps_per_epoch)
    purge = None if resumed_at is None else resumed_at + 1  # the first step a resume replays
    return _Metrics(run_dir, env.is_main, tensorboard, purge_step=purge)


class _Metrics:
    """metrics.jsonl plus TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        # Kept open for the whole run (closed in close()); appends survive a resume.
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard drops the events of the steps a resume replays (from purge_step on).
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
            except ImportError:  # tensorboard is an optional extra (staralign[tensorboard])
                log.warning("tensorboard is not installed: no event files will be written")

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
            if prefix != "train":  # the writer flushes on its own timer; epochs end with a flush
                self.tb.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _log_step(metrics: _Metrics, bar: Any, result: StepResult, step: TrainStep, epoch: int, index: int,
              steps_per_epoch: int) -> None:
    """A training record (loss, gradient norm, learning rate, loss parts) and the progress bar's figures."""
    parts = result.parts
    # One transfer for all parts (not one host sync per part).
    values = torch.stack([v.detach().float() for v in parts.values()]).tolist() if parts else []
    part_values = dict(zip(parts, values, strict=True))
    gstep = epoch * steps_per_epoch + index + 1
    record = {"kind": "train", "epoch": epoch + 1, "step": index + 1, "global_step": gstep,
              "loss": result.loss, "grad_norm": result.grad_norm, "lr": current_lr(step.optimizer),
              **part_values}
    metrics.write(record, gstep)
    last = len(result.output.heatmaps) - 1
    bar.set_postfix(loss=f"{result.loss:.4f}", **{
        k.split("/")[0][:5]: f"{v:.4f}" for k, v in part_values.items() if k.endswith(f"/{last}")
    })
    log.debug("epoch %d step %d loss %.5f", epoch + 1, index + 1, result.loss)


def _not_applied(result: StepResult, batch: dict[str, Any], epoch: int, index: int, rt: RuntimeConfig,
                 skipped: int) -> int:
    """A step left unapplied for a non-finite loss or gradient: stop the run (``runtime.on_nonfinite``
    "stop") or count the batch as skipped, up to ``runtime.max_skipped``; returns the new count."""
    msg = (f"non-finite loss {result.loss} / gradient norm {result.grad_norm} at epoch {epoch + 1} step {index} "
           f"(parts: {_fmt_parts(result.parts)}; images: {list(batch.get('image_path', []))[:4]})")
    if rt.on_nonfinite == "stop":
        log.error("%s; stopping without applying it (last checkpoint is intact)", msg)
        raise NonFiniteLossError(msg)
    skipped += 1
    log.warning("%s; batch skipped (%d so far)", msg, skipped)
    if skipped > rt.max_skipped:
        raise NonFiniteLossError(f"more than {rt.max_skipped} batches skipped for non-finite loss")
    return skipped


def _fmt_parts(parts: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


def _progress(enabled: bool, total: int, initial: int, desc: str):
    """The epoch's progress: a bar on a terminal, plain lines in a log (staralign.progress)."""
    from ..progress import progress

    return progress(total, desc, "step", initial=initial, enabled=enabled)


# --------------------------------------------------------------------------- validation and checkpoints


@dataclass
class _EpochTally:
    """One epoch's training figures, for its validation record."""

    started: float = field(default_factory=time.monotonic)
    loss_sum: float = 0.0
    steps: int = 0  # applied steps
    waited: list[float] = field(default_factory=lambda: [0.0])  # seconds the loop blocked on the loader
    train_seconds: float = 0.0

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1


def _validate(step: TrainStep, val_loader: Any, definition: LandmarkDefinition, env: distributed.DistEnv,
              config: TrainConfig, progress: RunProgress, metrics: _Metrics, tally: _EpochTally, epoch: int,
              partial_steps: int | None, steps_per_epoch: int) -> bool:
    """Validate the model and its EMA (last stack's NME), keep the best, record and log the epoch
    (``partial_steps``: the steps of an epoch a time budget cut short).  Returns whether the best improved."""
    from ..models.checkpoint import unwrap
    from .evaluator import evaluate_nmes

    rt, oc = config.runtime, config.optim
    # Images per second over the epoch's training steps (all processes), data loading included.
    images_per_s = tally.steps * oc.batch_size * env.world_size / max(tally.train_seconds, 1e-9)
    scored = {"model": unwrap(step.model)} | ({"ema": step.ema.module} if step.ema is not None else {})
    val = evaluate_nmes(scored, val_loader, definition, env.device, rt.amp, channels_last=rt.channels_last)
    improved = progress.update_best(val, epoch + 1)
    best = progress.best
    record = {"kind": "val", "epoch": epoch + 1, "nme": val["model"], "nme_ema": val.get("ema"),
              "best_nme": best["nme"], "best_epoch": best["epoch"],
              "train_loss": tally.loss_sum / max(tally.steps, 1),
              "epoch_seconds": time.monotonic() - tally.started, "train_seconds": tally.train_seconds,
              "images_per_s": images_per_s, "data_wait_seconds": tally.waited[0],
              "skipped_batches": progress.skipped,
              "lr": current_lr(step.optimizer)} | ({"partial_steps": partial_steps} if partial_steps else {})
    progress.history.append(record)
    metrics.write(record, (epoch + 1) * steps_per_epoch)
    log.info("epoch %d/%d: loss %.4f, NME %.4f%s, best %.4f (epoch %d, %s), %.0f s "
             "(%.1f images/s, %.1f s waiting for data)",
             epoch + 1, oc.epochs, record["train_loss"], val["model"],
             f", EMA {val['ema']:.4f}" if "ema" in val else "", best["nme"], best["epoch"],
             best["source"], record["epoch_seconds"], images_per_s, tally.waited[0])
    return improved


def _save_weights(run_dir: Path, env: distributed.DistEnv, step: TrainStep, best: dict[str, Any],
                  improved: bool) -> None:
    """last.safetensors (and last_ema), and best.safetensors when this epoch improved on the best."""
    from ..models import save_model

    if not env.is_main:
        return
    save_model(step.model, run_dir / "last.safetensors")
    if step.ema is not None:
        save_model(step.ema.module, run_dir / "last_ema.safetensors")
    if improved:
        src = step.ema.module if best["source"] == "ema" else step.model
        save_model(src, run_dir / "best.safetensors")


def _checkpoint(run_dir: Path, env: distributed.DistEnv, step: TrainStep, scheduler: LRScheduler,
                progress: RunProgress, epoch: int, batch: int) -> None:
    """Training state for resuming at batch ``batch`` of ``epoch``; rank 0 writes, everyone waits."""
    if env.is_main:
        save_checkpoint(run_dir, step, scheduler, progress, epoch, batch)
    distributed.barrier()


class _TimeBudget:
    """``runtime.time_budget_minutes`` (0: none), counted from the first step: the run stops once
    it is spent, or at an epoch's end when another epoch would not fit."""

    def __init__(self, minutes: float) -> None:
        self.minutes, self.seconds, self.start = minutes, minutes * 60, time.monotonic()

    def spent(self) -> str:
        """Why to stop now ("" to go on)."""
        if self.seconds and time.monotonic() - self.start > self.seconds:
            return f"time budget of {self.minutes:g} min reached"
        return ""

    def another_epoch_overruns(self, epochs_done: int) -> str:
        """Why to stop at this epoch boundary ("" to go on): another epoch, at the mean pace of the
        ``epochs_done`` so far (validation included), would overrun the budget."""
        if not self.seconds:
            return ""
        elapsed = time.monotonic() - self.start
        if elapsed + elapsed / epochs_done > self.seconds:
            return f"time budget of {self.minutes:g} min: another epoch would not fit"
        return ""


def _result(run_dir: Path, progress: RunProgress, start_epoch: int, stopped: str) -> TrainResult:
    history, best = progress.history, progress.best
    epochs_done = history[-1]["epoch"] if history else start_epoch
    last_val = {k: v for k, v in (history[-1].items() if history else []) if k in ("nme", "nme_ema")}
    return TrainResult(run_dir, epochs_done, best["nme"], best["epoch"], best["source"], last_val,
                       progress.skipped, stopped, history)
