"""Training: one function, ``train(config, run_dir)``, readable top to bottom.

A step is: images and landmarks to the device -> point/edge map targets built
there (or taken from the workers) -> forward -> the recipe loss over all stacks
-> a finiteness check -> backward -> optimiser step -> EMA update.  Each epoch
ends with the LR schedule, validation of the model and its EMA (last stack's
NME), and atomic checkpoints.  The same code runs on one CPU or, launched by
``torchrun``, on many GPUs.

Run directory::

    config.yaml         the resolved configuration (what was run)
    train.log           human log
    metrics.jsonl       one JSON object per log step and per epoch
    tb/                 TensorBoard event files
    train_state.pt      everything needed to resume (``--resume RUN_DIR``)
    last.safetensors    weights after the last finished epoch (our model format)
    best.safetensors    weights with the best validation NME (model or EMA)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import ConfigError, TrainConfig, save_yaml
from ..definitions import LandmarkDefinition, get_definition
from ..losses.recipe import RecipeLoss
from ..models.checkpoint import unwrap
from ..models.speed import autocast
from . import distributed as D
from .ema import ModelEMA, default_decay
from .preflight import preflight
from .resume import absolute_paths, resume_config
from .rundir import RunLock, prepare_new_run, run_failure, start_run, truncate_metrics
from .state import load_state, rng_state, save_state, set_rng_state

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


# --------------------------------------------------------------------------- set-up


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if not is_main:
        log.addHandler(logging.NullHandler())
        return
    fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(sh)


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
            except ImportError:  # pragma: no cover - tensorboard is a dependency
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



def _check_graphable(env: D.DistEnv) -> None:
    """``runtime.cuda_graphs`` runs one process on a CUDA device (DDP's collectives are not captured)."""
    if env.device.type != "cuda" or env.distributed:
        raise ConfigError("runtime.cuda_graphs needs one process on a CUDA device "
                          f"(this run: {env.world_size} process(es) on {env.device})")


def resolve_targets(targets: str, device: torch.device) -> str:
    """``data.targets`` made concrete: "auto" is "mixed" on CUDA (there it measured 1.1-1.2x
    "worker" end to end and level with "device", whose edge rasteriser costs the GPU ~24 ms a
    batch; docs/benchmarks.md) and "worker" elsewhere (the workers run beside a CPU step)."""
    if targets == "auto":
        return "mixed" if device.type == "cuda" else "worker"
    return targets


def needs_target_maps(config: TrainConfig) -> bool:
    """Whether a step needs point/edge map targets: the model has AAM heads and the loss scores
    them (``map_weight`` > 0).  Otherwise no one builds them, in the workers or on the device."""
    return config.model.use_aam and config.loss.map_weight > 0


def build_loaders(config: TrainConfig, definition: LandmarkDefinition, env: D.DistEnv):
    """Training and validation datasets and loaders (sharded across processes)."""
    from ..data.dataset import LandmarkDataset, collate_samples, find_annotation_file, worker_init_fn

    dc, mc = config.data, config.model
    train_file = find_annotation_file(dc.annot_dir, definition.name, dc.train_file)
    val_file = find_annotation_file(dc.annot_dir, definition.name, dc.val_file)
    placement = resolve_targets(dc.targets, env.device)
    targets = {"worker": "worker", "mixed": "edges"}.get(placement, "none") if needs_target_maps(config) else "none"
    train_ds = LandmarkDataset(
        train_file, dc.image_dir, definition, train=True, input_size=mc.input_size,
        heatmap_size=mc.heatmap_size, seed=config.runtime.seed, targets=targets,
        skip_bad_rows=dc.skip_bad_rows, aug_prob=dc.aug_prob,
        image_dtype="uint8" if dc.uint8_images else "float32",
    )
    val_ds = LandmarkDataset(
        val_file, dc.image_dir, definition, train=False, input_size=mc.input_size,
        heatmap_size=mc.heatmap_size, seed=config.runtime.seed, targets="none",
        skip_bad_rows=dc.skip_bad_rows,
    )
    for ds, f in ((train_ds, train_file), (val_ds, val_file)):
        skipped = getattr(ds, "skipped", [])
        if skipped:
            log.warning("%s: skipped %d bad rows (first: %s)", f, len(skipped), skipped[0])
    global_batch = config.optim.batch_size * env.world_size
    if len(train_ds) < global_batch:
        raise ValueError(f"{train_file}: {len(train_ds)} training samples, fewer than one global batch "
                         f"({global_batch}); lower --batch-size")
    sampler = D.EpochSampler(len(train_ds), seed=config.runtime.seed, shuffle=True, rank=env.rank,
                             world_size=env.world_size, batch_size=config.optim.batch_size, drop_last=True)
    pin = env.device.type == "cuda"
    workers = dc.workers
    train_loader = DataLoader(
        train_ds, batch_size=config.optim.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_samples, pin_memory=pin, drop_last=True, worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    val_indices = list(range(env.rank, len(val_ds), env.world_size))
    val_loader = DataLoader(
        torch.utils.data.Subset(val_ds, val_indices), batch_size=dc.val_batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate_samples, pin_memory=pin, worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0,
    )
    return train_ds, val_ds, train_loader, val_loader, sampler


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          overwrite: bool = False, saved: TrainConfig | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in ``run_dir``; returns a summary.

    A new run refuses a folder that holds one unless ``overwrite``; the folder is locked
    for the run's duration (:mod:`.rundir`); the data is checked before the first step
    (:mod:`.preflight`); a resume may change the settings :mod:`.resume` allows.  ``saved``:
    the run's ``config.yaml`` when the caller has read it already (else it is read here)."""
    from ..data.targets import batch_targets
    from ..data.transforms import network_input
    from ..models import build_model, save_model
    from .evaluator import evaluate_nmes
    from .graphed import GraphedTrainStep

    run_dir = Path(run_dir)
    changes: list[str] = []
    if resume:
        # A run continues as it was configured: the saved configuration wins (before any set-up).
        from ..config import load_yaml

        if saved is None:
            saved = load_yaml(TrainConfig, run_dir / "config.yaml")
        config, changes, refused = resume_config(saved, config)
        if refused:
            warnings.warn(f"resuming {run_dir} with the configuration saved there; {', '.join(refused)} "
                          "differ(s) in the one passed in and is ignored", stacklevel=2)
    config = absolute_paths(config)
    config.validate()
    env = D.setup(config.runtime.device)
    rt, oc = config.runtime, config.optim
    lock = RunLock(run_dir)
    anomaly_before = torch.is_anomaly_enabled()
    try:
        definition = get_definition(config.model.definition)
        # The data first: a run that cannot start must not have cleared the folder it would use.
        checked = preflight(config, definition)
        if env.is_main:
            lock.acquire()
            if not resume:
                prepare_new_run(run_dir, overwrite)
        D.barrier()
        _setup_logging(run_dir, env.is_main)
        resumed_run, resume = resume, start_run(run_dir, lock, env.is_main, resume, changes)
        torch.manual_seed(rt.seed)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = rt.cudnn_benchmark
        torch.autograd.set_detect_anomaly(rt.detect_anomaly)  # restored in finally: no mode left behind

        log.info("%s", checked)
        if env.is_main and (not resume or changes):
            save_yaml(config, run_dir / "config.yaml")
        train_ds, _, train_loader, val_loader, sampler = build_loaders(config, definition, env)
        size, hsize = config.model.input_size, config.model.heatmap_size

        model = build_model(config.model, definition).to(env.device)
        if rt.sync_bn and env.distributed:
            model = D.convert_sync_batchnorm(model, env.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        decay = oc.ema_decay if oc.ema_decay is not None else default_decay(oc.batch_size * env.world_size)
        ema = ModelEMA(model, decay) if oc.ema else None
        criterion = RecipeLoss(config.loss)
        needs_maps = needs_target_maps(config)
        if rt.cuda_graphs:
            _check_graphable(env)
        optimizer = build_optimizer(model, oc, graphable=rt.cuda_graphs)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(oc.milestones), gamma=oc.gamma)
        scaler = torch.amp.GradScaler(env.device.type, enabled=rt.amp == "fp16")

        start_epoch, start_step, best, counters = 0, 0, {"nme": math.inf, "epoch": -1, "source": ""}, {}
        history: list[dict[str, Any]] = []
        if resume:
            state = load_state(run_dir, map_location=env.device, complete=True)
            model.load_state_dict(state["model"])
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scheduler.milestones, scheduler.gamma = Counter(oc.milestones), oc.gamma  # a resume may change them
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_step = state["epoch"], state["step"]
            best, counters, history = state["best"], state["counters"], state.get("history", [])
            # A budget stop's partial-epoch record: the resumed epoch records itself when it ends
            # (as metrics.jsonl is cut back to the resumed step).
            history = [h for h in history if not h.get("partial_steps")]
            set_rng_state(state["rng"])
            log.info("resumed %s at epoch %d step %d", run_dir, start_epoch, start_step)

        net: nn.Module = model
        if env.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        if rt.compile:
            net = torch.compile(net)
            criterion = torch.compile(criterion)  # fuses STAR's many small per-landmark kernels

        steps_per_epoch = sampler.batches_per_epoch()
        resumed_at = start_epoch * steps_per_epoch + start_step if resumed_run else None
        if env.is_main and resumed_run:
            truncate_metrics(run_dir, resumed_at, steps_per_epoch)
        purge = None if resumed_at is None else resumed_at + 1  # the first step a resume replays
        metrics = _Metrics(run_dir, env.is_main, rt.tensorboard, purge_step=purge)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("training %s: %d samples, %d steps/epoch, %d processes on %s, %.2fM parameters",
                 definition.name, len(train_ds), steps_per_epoch, env.world_size, env.device, n_params / 1e6)
        skipped = int(counters.get("skipped_batches", 0))
        graphed: GraphedTrainStep | None = None
        t_start = time.monotonic()
        budget_s = rt.time_budget_minutes * 60
        stopped = ""

        def checkpoint(epoch: int, step: int) -> None:
            """Training state for resuming; rank 0 writes, everyone waits."""
            if env.is_main:
                save_state(run_dir, {
                    "model": model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch, "step": step, "best": best,
                    "counters": {"skipped_batches": skipped},
                    "history": history,
                    "rng": rng_state(),
                })
            D.barrier()

        for epoch in range(start_epoch, oc.epochs):
            first_step = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip_batches=first_step)
            train_ds.set_epoch(epoch)
            net.train()
            sums: dict[str, float] = {}
            n_logged = 0
            progress = _progress(env.is_main, total=steps_per_epoch, initial=first_step,
                                 desc=f"epoch {epoch + 1}/{oc.epochs}")
            t_epoch = time.monotonic()
            step = first_step
            waited = [0.0]  # seconds the loop blocked on the loader this epoch
            for step, batch in enumerate(_timed(train_loader, waited), start=first_step):
                images = batch["image"].to(env.device, non_blocking=True)
                landmarks = batch["landmarks"].to(env.device, non_blocking=True)
                pointmaps, edgemaps = (batch_targets(batch, definition, size, hsize, env.device)
                                       if needs_maps else (None, None))
                if rt.cuda_graphs:
                    if graphed is None:  # captured from the first batch, after any resume
                        t_capture = time.monotonic()
                        graphed = GraphedTrainStep(net, model, criterion, optimizer, ema, images, landmarks,
                                                   pointmaps, edgemaps, amp=rt.amp, grad_clip=oc.grad_clip,
                                                   channels_last=rt.channels_last,
                                                   capture=env.device.type == "cuda")
                        log.info("training step captured as a CUDA graph (%.1f s)", time.monotonic() - t_capture)
                    res = graphed(images, landmarks, pointmaps, edgemaps)
                else:
                    res = train_step(net, model, criterion, optimizer, scaler, ema,
                                     network_input(images, rt.channels_last), landmarks, pointmaps, edgemaps,
                                     amp=rt.amp, grad_clip=oc.grad_clip)
                loss_v, gnorm_v, parts = res.loss, res.grad_norm, res.parts
                if not res.applied:
                    msg = (f"non-finite loss {loss_v} / gradient norm {gnorm_v} at epoch {epoch + 1} step {step} "
                           f"(parts: {_fmt_parts(parts)}; images: {list(batch.get('image_path', []))[:4]})")
                    if rt.on_nonfinite == "stop":
                        log.error("%s; stopping without applying it (last checkpoint is intact)", msg)
                        raise NonFiniteLossError(msg)
                    skipped += 1
                    log.warning("%s; batch skipped (%d so far)", msg, skipped)
                    if skipped > rt.max_skipped:
                        raise NonFiniteLossError(f"more than {rt.max_skipped} batches skipped for non-finite loss")
                    continue

                n_logged += 1
                sums["loss"] = sums.get("loss", 0.0) + loss_v
                if (step + 1) % rt.log_every == 0 or step + 1 == steps_per_epoch:
                    # One transfer for all parts (not one host sync per part).
                    values = torch.stack([v.detach().float() for v in parts.values()]).tolist() if parts else []
                    part_values = dict(zip(parts, values, strict=True))
                    gstep = epoch * steps_per_epoch + step + 1
                    record = {"kind": "train", "epoch": epoch + 1, "step": step + 1, "global_step": gstep,
                              "loss": loss_v, "grad_norm": gnorm_v, "lr": current_lr(optimizer),
                              **part_values}
                    metrics.write(record, gstep)
                    last = len(res.output.heatmaps) - 1
                    progress.set_postfix(loss=f"{loss_v:.4f}", **{
                        k.split("/")[0][:5]: f"{v:.4f}" for k, v in part_values.items() if k.endswith(f"/{last}")
                    })
                    log.debug("epoch %d step %d loss %.5f", epoch + 1, step + 1, loss_v)
                progress.update(1)
                if rt.save_every_steps and (step + 1) % rt.save_every_steps == 0 and step + 1 < steps_per_epoch:
                    checkpoint(epoch, step + 1)
                if budget_s and time.monotonic() - t_start > budget_s:
                    stopped = f"time budget of {rt.time_budget_minutes:g} min reached"
                    break
            progress.close()
            # A budget that ends mid-epoch still ends with a validated, saved model: the partial
            # epoch is validated and saved like a full one, and the state resumes at this step.
            mid_epoch = bool(stopped) and step + 1 < steps_per_epoch

            train_seconds = time.monotonic() - t_epoch
            # Images per second over the epoch's training steps (all processes), data loading included.
            images_per_s = n_logged * oc.batch_size * env.world_size / max(train_seconds, 1e-9)
            if not mid_epoch:
                scheduler.step()
            scored = {"model": unwrap(model)} | ({"ema": ema.module} if ema is not None else {})
            val = evaluate_nmes(scored, val_loader, definition, env.device, rt.amp, channels_last=rt.channels_last)
            improved = False
            for source, nme in val.items():
                if nme < best["nme"]:
                    best = {"nme": nme, "epoch": epoch + 1, "source": source}
                    improved = True
            record = {"kind": "val", "epoch": epoch + 1, "nme": val["model"], "nme_ema": val.get("ema"),
                      "best_nme": best["nme"], "best_epoch": best["epoch"],
                      "train_loss": sums.get("loss", 0.0) / max(n_logged, 1),
                      "epoch_seconds": time.monotonic() - t_epoch, "train_seconds": train_seconds,
                      "images_per_s": images_per_s, "data_wait_seconds": waited[0],
                      "skipped_batches": skipped,
                      "lr": current_lr(optimizer)} | ({"partial_steps": step + 1} if mid_epoch else {})
            history.append(record)
            metrics.write(record, (epoch + 1) * steps_per_epoch)
            log.info("epoch %d/%d: loss %.4f, NME %.4f%s, best %.4f (epoch %d, %s), %.0f s "
                     "(%.1f images/s, %.1f s waiting for data)",
                     epoch + 1, oc.epochs, record["train_loss"], val["model"],
                     f", EMA {val['ema']:.4f}" if "ema" in val else "", best["nme"], best["epoch"],
                     best["source"], record["epoch_seconds"], images_per_s, waited[0])
            if env.is_main:
                save_model(model, run_dir / "last.safetensors")
                if ema is not None:
                    save_model(ema.module, run_dir / "last_ema.safetensors")
                if improved:
                    src = ema.module if best["source"] == "ema" else model
                    save_model(src, run_dir / "best.safetensors")
            if mid_epoch:
                checkpoint(epoch, step + 1)
                log.info("stopping: %s (mid-epoch %d: validated and saved at step %d of %d)", stopped,
                         epoch + 1, step + 1, steps_per_epoch)
                break
            checkpoint(epoch + 1, 0)
            if not stopped and budget_s and epoch + 1 < oc.epochs:
                # Stop at an epoch boundary when another epoch (at the mean pace so far,
                # validation included) would overrun the budget.
                done = epoch + 1 - start_epoch
                elapsed = time.monotonic() - t_start
                if elapsed + elapsed / done > budget_s:
                    stopped = f"time budget of {rt.time_budget_minutes:g} min: another epoch would not fit"
            if stopped:
                log.info("stopping: %s after epoch %d", stopped, epoch + 1)
                break

        metrics.close()
        epochs_done = history[-1]["epoch"] if history else start_epoch
        last_val = {k: v for k, v in (history[-1].items() if history else []) if k in ("nme", "nme_ema")}
        return TrainResult(run_dir, epochs_done, best["nme"], best["epoch"], best["source"], last_val,
                           skipped, stopped, history)
    except Exception as exc:  # errors a user can fix: one line (rundir.run_failure), not a traceback
        failure = run_failure(exc, run_dir)
        if failure is None:
            raise
        log.error("%s", failure)
        raise failure from exc
    finally:
        lock.release()
        torch.autograd.set_detect_anomaly(anomaly_before)
        D.teardown()


@dataclass
class StepResult:
    """One optimisation step: its loss and gradient norm (host floats), loss parts, output, and
    whether it was applied (it is not when the loss or gradient norm is not finite)."""

    loss: float
    grad_norm: float
    parts: dict[str, torch.Tensor]
    output: Any
    applied: bool


def train_step(
    net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, ema: ModelEMA | None, images: torch.Tensor, landmarks: torch.Tensor,
    pointmaps: torch.Tensor | None, edgemaps: torch.Tensor | None, *, amp: str = "none", grad_clip: float = 0.0,
) -> StepResult:
    """Forward, the loss over all stacks, backward, gradient clipping, then -- only if the loss and
    gradient norm are finite -- the optimiser step and the EMA update.  ``net`` is what runs the
    forward (``model`` possibly wrapped by DDP or torch.compile).  The one step the trainer runs
    and ``staralign bench train`` times (:class:`~staralign.engine.graphed.GraphedTrainStep` is
    the same step captured as a CUDA graph)."""
    optimizer.zero_grad(set_to_none=True)
    output, loss, gnorm, parts = forward_backward(net, model, criterion, optimizer, scaler, images, landmarks,
                                                  pointmaps, edgemaps, amp=amp, grad_clip=grad_clip)
    # One host sync per step: the loss and gradient norm must be finite before anything is
    # applied (the progress bar needs the values anyway).  Under fp16 an infinite norm is the
    # scaler's business: it skips that update itself and lowers the scale.
    loss_v, gnorm_v = torch.stack([loss.detach().float(), gnorm.float()]).tolist()
    applied = math.isfinite(loss_v) and (math.isfinite(gnorm_v) or amp == "fp16")
    if applied:
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
    else:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_v, gnorm_v, parts, output, applied)


def forward_backward(
    net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, images: torch.Tensor, landmarks: torch.Tensor,
    pointmaps: torch.Tensor | None, edgemaps: torch.Tensor | None, *, amp: str = "none", grad_clip: float = 0.0,
) -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The device work of a step up to the update: (output, loss, gradient norm, loss parts).
    Gradients are written into ``model``'s ``.grad`` (clipped when ``grad_clip`` > 0); nothing
    here waits for the device."""
    with autocast(images.device, amp):
        output = net(images)
    loss, parts = criterion(output, landmarks, pointmaps, edgemaps)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), rt_clip(grad_clip), error_if_nonfinite=False)
    return output, loss, gnorm, parts


def _timed(loader, waited: list[float]):
    """Iterate ``loader``, adding the time spent waiting for each batch to ``waited[0]``.

    The step ends with a host sync, so this is time the device had no work from us: a
    loader that keeps up shows near zero (reported per epoch as ``data_wait_seconds``)."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield batch


def build_optimizer(model: nn.Module, oc, graphable: bool = False) -> torch.optim.Optimizer:
    """Adam as the original (no weight decay unless asked), or AdamW / SGD with momentum.

    ``graphable``: an Adam/AdamW that can run inside a CUDA graph -- fused (it skips its
    update on the device when told to), capturable, and with the learning rate in a device
    tensor so that the schedule reaches a captured step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if oc.optimizer == "sgd":
        if graphable:
            raise ValueError("runtime.cuda_graphs needs optim.optimizer adam or adamw, not sgd")
        return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    cls = torch.optim.AdamW if oc.optimizer == "adamw" else torch.optim.Adam
    if graphable:
        lr = torch.tensor(float(oc.lr), device=params[0].device)
        return cls(params, lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay, fused=True, capturable=True)
    return cls(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first group's learning rate as a float (a graphable optimiser keeps it in a tensor)."""
    return float(optimizer.param_groups[0]["lr"])


def rt_clip(value: float) -> float:
    """``clip_grad_norm_`` threshold: infinite when clipping is off (the norm is still measured)."""
    return value if value > 0 else math.inf


def _fmt_parts(parts: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


def _progress(enabled: bool, total: int, initial: int, desc: str):
    """The epoch's progress: a bar on a terminal, plain lines in a log (staralign.progress)."""
    from ..progress import progress

    return progress(total, desc, "step", initial=initial, enabled=enabled)
