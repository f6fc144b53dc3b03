"""Exponential moving average of a model's weights and float buffers.

``ema = decay * ema + (1 - decay) * model`` after every optimiser step, as the
original does, but with one fused ``foreach`` lerp over all tensors instead of a
Python loop per parameter (which costs the original ~65 ms a step on an H200).
Integer buffers (BatchNorm's ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def default_decay(global_batch_size: int) -> float:
    """The original's decay: ``0.5 ** (global batch / 10000)`` (a half-life of 10,000 samples)."""
    return 0.5 ** (global_batch_size / 10000.0)


class ModelEMA:
    """Holds an averaged copy of ``model`` (same structure, no gradients, eval mode)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._float: list[torch.Tensor] = []
        self._other: list[torch.Tensor] = []
        self._bind()

    def _bind(self) -> None:
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        self._float = [t for t in tensors if t.is_floating_point()]
        self._other = [t for t in self.module.buffers() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        tensors = list(src.parameters()) + list(src.buffers())
        floats = [t.detach() for t in tensors if t.is_floating_point()]
        if len(floats) != len(self._float):
            raise RuntimeError("EMA and model have different structures")
        torch._foreach_lerp_(self._float, floats, 1.0 - self.decay)
        others = [t for t in src.buffers() if not t.is_floating_point()]
        for dst, s in zip(self._other, others, strict=True):
            dst.copy_(s)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
