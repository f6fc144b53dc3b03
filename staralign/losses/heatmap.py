"""Losses between predicted and target maps (B, C, H, W)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heatmaps import upcast_half


class AWingTerms(NamedTuple):
    """Target-only terms of :class:`AWingLoss` (see :meth:`AWingLoss.target_terms`)."""

    target: Tensor
    power: Tensor
    a: Tensor
    c: Tensor
    weight: Tensor | None


class AWingLoss(nn.Module):
    """Adaptive Wing loss (Wang et al., ICCV 2019) with its foreground weight map.

    Defaults are the original recipe's: omega 14, theta 0.5, epsilon 1, alpha 2.1,
    weight ``w * [maxpool3x3(gt) >= 0.2] + 1`` with ``w = 10``.
    """

    def __init__(
        self,
        omega: float = 14.0,
        theta: float = 0.5,
        epsilon: float = 1.0,
        alpha: float = 2.1,
        use_weight_map: bool = True,
        weight: float = 10.0,
        weight_threshold: float = 0.2,
    ) -> None:
        super().__init__()
        self.omega, self.theta, self.epsilon, self.alpha = omega, theta, epsilon, alpha
        self.use_weight_map = use_weight_map
        self.weight, self.weight_threshold = weight, weight_threshold

    def weight_map(self, target: Tensor) -> Tensor:
        dilated = F.max_pool2d(target, kernel_size=3, stride=1, padding=1)
        return self.weight * (dilated >= self.weight_threshold).to(target.dtype) + 1

    def target_terms(self, target: Tensor, dtype: torch.dtype) -> AWingTerms:
        """The parts of the loss that depend only on the target: a recipe scoring S stacks
        against the same target maps computes them once, not S times."""
        target = target.to(dtype)
        power = self.alpha - target
        ratio = self.theta / self.epsilon
        ratio_pow = torch.pow(ratio, power)
        a = self.omega / (1 + ratio_pow) * power * torch.pow(ratio, power - 1) / self.epsilon
        c = self.theta * a - self.omega * torch.log1p(ratio_pow)
        weight = self.weight_map(target) if self.use_weight_map else None
        return AWingTerms(target, power, a, c, weight)

    def forward(self, pred: Tensor, target: Tensor, terms: AWingTerms | None = None) -> Tensor:
        pred = upcast_half(pred)
        if terms is None or terms.target.dtype != pred.dtype:
            terms = self.target_terms(target, pred.dtype)
        delta = (pred - terms.target).abs()
        small = self.omega * torch.log1p(torch.pow(delta / self.epsilon, terms.power))
        loss = torch.where(delta < self.theta, small, terms.a * delta - terms.c)
        if terms.weight is not None:
            loss = loss * terms.weight
        return loss.mean()
