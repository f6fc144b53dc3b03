"""The training step captured once as a CUDA graph and replayed for every batch.

Eager, a step of the paper network launches several thousand small kernels (4 hourglass
stacks forward and backward, the loss per stack, clipping, Adam, EMA), one by one from
Python; on a fast GPU the card then waits on the CPU.  Replaying a captured graph launches
them all at once.  The step is :func:`~staralign.engine.trainer.train_step`'s, with one
difference forced by the graph: the decision not to apply a non-finite step is taken on the
device.  A flag set when the loss or gradient norm is not finite makes the fused Adam skip
its update (moments and step count included) and the EMA keep its value; the host reads
loss and gradient norm after the replay, as the eager step does, and stops or counts.

Limits: CUDA, one process (no DDP), ``amp`` none or bf16 (fp16's loss scaling decides on
the host), Adam/AdamW built with ``build_optimizer(..., graphable=True)``, and one batch
shape (training drops the last partial batch).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..data.transforms import network_input
from .ema import ModelEMA
from .trainer import StepResult, forward_backward


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
