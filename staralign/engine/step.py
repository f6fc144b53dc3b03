"""The training step and its construction, in one place for the trainer and ``staralign bench train``.

One step (:meth:`TrainStep.__call__`): the batch to the device -> point/edge map targets
built there (or taken from the loader workers, :mod:`.loaders`) -> forward under autocast ->
the recipe loss over all stacks -> backward -> gradient clipping -> a finiteness check ->
optimiser step -> EMA update.  A step whose loss or gradient norm is not finite is not
applied; what to do about it (stop, or skip and count) is the trainer's decision.

:func:`build_train_step` builds what a step needs from a :class:`~staralign.config.TrainConfig`:
the model (SyncBatchNorm across processes, channels-last), the recipe loss, the optimiser,
the EMA and the gradient scaler, then DDP and ``torch.compile`` around them.  With
``runtime.cuda_graphs`` the first call captures the step as one CUDA graph and every later
call replays it (:class:`GraphedTrainStep`).

Why a graph: eager, a step of the paper network launches several thousand small kernels (4
hourglass stacks forward and backward, the loss per stack, clipping, Adam, EMA), one by one
from Python; on a fast GPU the card then waits on the CPU.  Replaying a captured graph
launches them all at once.  The captured step is :func:`train_step`'s, with one difference
forced by the graph: the decision not to apply a non-finite step is taken on the device.  A
flag set when the loss or gradient norm is not finite makes the fused Adam skip its update
(moments and step count included) and the EMA keep its value; the host reads loss and
gradient norm after the replay, as the eager step does, and stops or counts.

Limits of the graph: CUDA, one process (no DDP), ``amp`` none or bf16 (fp16's loss scaling
decides on the host), Adam/AdamW built with ``build_optimizer(..., graphable=True)``, and one
batch shape (training drops the last partial batch).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, OptimConfig, TrainConfig
from ..data.targets import batch_targets
from ..data.transforms import network_input
from ..definitions import LandmarkDefinition
from ..losses.recipe import RecipeLoss
from ..precision import autocast
from .ema import ModelEMA, default_decay

__all__ = [
    "GraphedTrainStep",
    "StepResult",
    "TrainStep",
    "build_optimizer",
    "build_train_step",
    "current_lr",
    "forward_backward",
    "grad_clip_threshold",
    "needs_target_maps",
    "train_step",
]

log = logging.getLogger("staralign.train")


@dataclass
class StepResult:
    """One optimisation step: its loss and gradient norm (host floats), loss parts, output, and
    whether it was applied (it is not when the loss or gradient norm is not finite)."""

    loss: float
    grad_norm: float
    parts: dict[str, torch.Tensor]
    output: Any
    applied: bool


# --------------------------------------------------------------------------- construction


def needs_target_maps(config: TrainConfig) -> bool:
    """Whether a step needs point/edge map targets: the model has AAM heads and the loss scores
    them (``map_weight`` > 0).  Otherwise no one builds them, in the workers or on the device."""
    return config.model.use_aam and config.loss.map_weight > 0


@dataclass(eq=False)
class TrainStep:
    """``step(batch) -> StepResult``: one optimisation step of ``model`` on a loader batch.

    ``model`` holds the parameters (saved, evaluated, averaged into ``ema``); ``net`` runs the
    forward (``model`` wrapped by DDP and/or ``torch.compile``); ``loss`` is the recipe loss and
    ``criterion`` what computes it (``loss`` compiled when asked).  State a resume restores is
    loaded into ``model``, ``ema``, ``optimizer`` and ``scaler`` before the first call."""

    model: nn.Module
    net: nn.Module
    loss: RecipeLoss
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    definition: LandmarkDefinition
    device: torch.device
    input_size: int
    heatmap_size: int
    needs_maps: bool
    amp: str = "none"
    grad_clip: float = 0.0
    channels_last: bool = False
    cuda_graphs: bool = False
    graphed: GraphedTrainStep | None = None  # captured at the first call with cuda_graphs

    def __call__(self, batch: dict[str, Any]) -> StepResult:
        images = batch["image"].to(self.device, non_blocking=True)
        landmarks = batch["landmarks"].to(self.device, non_blocking=True)
        pointmaps, edgemaps = (batch_targets(batch, self.definition, self.input_size, self.heatmap_size, self.device)
                               if self.needs_maps else (None, None))
        if not self.cuda_graphs:
            return train_step(self.net, self.model, self.criterion, self.optimizer, self.scaler, self.ema,
                              network_input(images, self.channels_last), landmarks, pointmaps, edgemaps,
                              amp=self.amp, grad_clip=self.grad_clip)
        if self.graphed is None:  # captured from the first batch, after any resume has loaded the state
            t_capture = time.monotonic()
            self.graphed = GraphedTrainStep(self.net, self.model, self.criterion, self.optimizer, self.ema, images,
                                            landmarks, pointmaps, edgemaps, amp=self.amp, grad_clip=self.grad_clip,
                                            channels_last=self.channels_last, capture=self.device.type == "cuda")
            log.info("training step captured as a CUDA graph (%.1f s)", time.monotonic() - t_capture)
        return self.graphed(images, landmarks, pointmaps, edgemaps)


def build_train_step(config: TrainConfig, definition: LandmarkDefinition, device: torch.device, *,
                     world_size: int = 1, distributed: bool = False) -> TrainStep:
    """The step of ``config`` on ``device``: model, recipe loss, optimiser, EMA, gradient scaler,
    DDP (``distributed``) and ``torch.compile``; the CUDA graph is captured at the first call.
    ``world_size`` processes make the global batch (the EMA's default decay depends on it).
    Seed torch before calling this: the model's initial weights are drawn here."""
    from ..models import build_model
    from .distributed import convert_sync_batchnorm

    rt, oc = config.runtime, config.optim
    if rt.cuda_graphs:
        _check_graphable(device, world_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
    model = build_model(config.model, definition).to(device)
    if rt.sync_bn and distributed:
        model = convert_sync_batchnorm(model, device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay = oc.ema_decay if oc.ema_decay is not None else default_decay(oc.batch_size * world_size)
    ema = ModelEMA(model, decay) if oc.ema else None
    loss = RecipeLoss(config.loss)
    optimizer = build_optimizer(model, oc, graphable=rt.cuda_graphs)
    scaler = torch.amp.GradScaler(device.type, enabled=rt.amp == "fp16")
    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion: nn.Module = loss
    if rt.compile:
        net = torch.compile(net)
        criterion = torch.compile(loss)  # fuses STAR's many small per-landmark kernels
    return TrainStep(model, net, loss, criterion, optimizer, scaler, ema, definition, device,
                     config.model.input_size, config.model.heatmap_size, needs_target_maps(config),
                     amp=rt.amp, grad_clip=oc.grad_clip, channels_last=rt.channels_last, cuda_graphs=rt.cuda_graphs)


def _check_graphable(device: torch.device, world_size: int) -> None:
    """``runtime.cuda_graphs`` runs one process on a CUDA device (DDP's collectives are not captured)."""
    if device.type != "cuda" or world_size > 1:
        raise ConfigError("runtime.cuda_graphs needs one process on a CUDA device "
                          f"(this run: {world_size} process(es) on {device})")


def build_optimizer(model: nn.Module, oc: OptimConfig, graphable: bool = False) -> torch.optim.Optimizer:
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


# --------------------------------------------------------------------------- the step


def train_step(
    net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, ema: ModelEMA | None, images: torch.Tensor, landmarks: torch.Tensor,
    pointmaps: torch.Tensor | None, edgemaps: torch.Tensor | None, *, amp: str = "none", grad_clip: float = 0.0,
) -> StepResult:
    """Forward, the loss over all stacks, backward, gradient clipping, then -- only if the loss and
    gradient norm are finite -- the optimiser step and the EMA update.  ``net`` is what runs the
    forward (``model`` possibly wrapped by DDP or torch.compile).  The one eager step the trainer
    runs and ``staralign bench train`` times (:class:`GraphedTrainStep` is
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
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_threshold(grad_clip),
                                           error_if_nonfinite=False)
    return output, loss, gnorm, parts


def grad_clip_threshold(grad_clip: float) -> float:
    """``clip_grad_norm_``'s max norm for ``optim.grad_clip``: infinite when clipping is off (0),
    so the gradient norm is still measured (the finiteness check and the log need it)."""
    return grad_clip if grad_clip > 0 else math.inf


# --------------------------------------------------------------------------- the step as a CUDA graph


class GraphedTrainStep:
    """``step(images, landmarks, pointmaps, edgemaps) -> StepResult``, replaying one graph.

    Capture happens on construction, from the example batch: a few warm-up steps (cuDNN
    plans, Adam's state, lazily built grids) run with the update forced off, the model's
    buffers are then put back, so constructing this does not train.  Inputs are copied into
    the graph's static buffers on each call; the returned ``parts`` and ``output`` live in
    the graph's memory and are overwritten by the next call.  ``capture=False`` runs the
    same device-side step eagerly (any device), which is how the CPU tests check it.
    """

    def __init__(
        self, net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
        ema: ModelEMA | None, images: Tensor, landmarks: Tensor, pointmaps: Tensor | None,
        edgemaps: Tensor | None, *, amp: str = "none", grad_clip: float = 0.0, channels_last: bool = False,
        warmup: int = 3, capture: bool = True,
    ) -> None:
        if amp == "fp16":
            raise ValueError("CUDA-graph training supports amp none or bf16: fp16's loss scaler decides on the host")
        group = optimizer.param_groups[0]
        lr = group["lr"]
        if not (group.get("fused") and group.get("capturable") and torch.is_tensor(lr)
                and lr.device == group["params"][0].device):
            raise ValueError("CUDA-graph training needs the optimiser from build_optimizer(..., graphable=True): "
                             "fused (it skips a flagged update), capturable, and with its learning rate in a "
                             "tensor beside the parameters that the schedule updates in place")
        if capture and images.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the batch is on {images.device}")
        self.net, self.model, self.criterion, self.optimizer, self.ema = net, model, criterion, optimizer, ema
        self.amp, self.grad_clip, self.channels_last = amp, grad_clip, channels_last
        self.scaler = torch.amp.GradScaler(images.device.type, enabled=False)
        self.inputs = [None if t is None else t.detach().clone() for t in (images, landmarks, pointmaps, edgemaps)]
        device = images.device
        self.skip = torch.zeros((), device=device)  # 1: this step is not applied
        self.force_skip = torch.zeros((), device=device)  # 1 during warm-up
        optimizer.found_inf = self.skip  # read by the fused Adam/AdamW: skip the update when 1
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture(warmup)

    def _body(self) -> tuple[Tensor, dict[str, Tensor], object]:
        """Everything on the device: forward, loss, backward, clip, flag, Adam, EMA."""
        images, landmarks, pointmaps, edgemaps = self.inputs
        output, loss, gnorm, parts = forward_backward(
            self.net, self.model, self.criterion, self.optimizer, self.scaler,
            network_input(images, self.channels_last), landmarks, pointmaps, edgemaps,
            amp=self.amp, grad_clip=self.grad_clip)
        stats = torch.stack([loss.detach().float(), gnorm.detach().float()])
        self.skip.copy_(torch.maximum((~torch.isfinite(stats)).any().float(), self.force_skip))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, skip=self.skip)
        return stats, parts, output

    def _capture(self, warmup: int) -> None:
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]  # BatchNorm statistics move in warm-up forwards
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        self.force_skip.fill_(1.0)
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        current.wait_stream(side)
        self.force_skip.fill_(0.0)
        with torch.no_grad():
            for b, v in zip(buffers, saved, strict=True):
                b.copy_(v)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body()

    def __call__(self, images: Tensor, landmarks: Tensor, pointmaps: Tensor | None,
                 edgemaps: Tensor | None) -> StepResult:
        for static, new, name in zip(self.inputs, (images, landmarks, pointmaps, edgemaps),
                                     ("images", "landmarks", "pointmaps", "edgemaps"), strict=True):
            if static is None:
                continue
            if new is None or new.shape != static.shape or new.dtype != static.dtype:
                got = "None" if new is None else f"{tuple(new.shape)} {new.dtype}"
                raise ValueError(f"{name}: the step was captured for {tuple(static.shape)} {static.dtype}, got {got}")
            static.copy_(new, non_blocking=True)
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            stats, parts, output = self._body()
        else:
            self.graph.replay()
            stats, parts, output = self.out
        loss_v, gnorm_v = stats.tolist()  # the step's one host sync, after all its work is queued
        applied = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        return StepResult(loss_v, gnorm_v, parts, output, applied)
