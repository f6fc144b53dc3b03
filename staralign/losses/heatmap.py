"""Losses between predicted and target maps (B, C, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heatmaps import upcast_half


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

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = upcast_half(pred)
        target = target.to(pred.dtype)
        delta = (pred - target).abs()
        power = self.alpha - target
        ratio = self.theta / self.epsilon
        ratio_pow = torch.pow(ratio, power)
        a = self.omega / (1 + ratio_pow) * power * torch.pow(ratio, power - 1) / self.epsilon
        c = self.theta * a - self.omega * torch.log1p(ratio_pow)
        small = self.omega * torch.log1p(torch.pow(delta / self.epsilon, power))
        loss = torch.where(delta < self.theta, small, a * delta - c)
        if self.use_weight_map:
            loss = loss * self.weight_map(target)
        return loss.mean()

