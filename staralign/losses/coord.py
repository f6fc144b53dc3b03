"""Losses on landmark coordinates (B, N, 2), e.g. from soft-argmax: the baselines."""

from __future__ import annotations

from torch import Tensor, nn

from .distances import smooth_l1_of_sq, wing_of_sq


def _sq_dist(pred: Tensor, gt: Tensor) -> Tensor:
    return (pred - gt).pow(2).sum(dim=-1)


class SmoothL1Loss(nn.Module):
    """Smooth-L1 on each point's Euclidean error, mean over points (the original's, scale 0.01)."""

    def __init__(self, scale: float = 0.01) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        return smooth_l1_of_sq(_sq_dist(pred, gt), self.scale).mean()


class WingLoss(nn.Module):
    """Wing loss on each point's Euclidean error, mean over points (the original's defaults)."""

    def __init__(self, omega: float = 0.01, epsilon: float = 2.0) -> None:
        super().__init__()
        self.omega, self.epsilon = omega, epsilon

    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        return wing_of_sq(_sq_dist(pred, gt), self.omega, self.epsilon).mean()


class L1Loss(nn.Module):
    """Mean absolute error over all coordinates."""

    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        return (pred - gt).abs().mean()


class L2Loss(nn.Module):
    """Mean squared error over all coordinates."""

    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        return (pred - gt).pow(2).mean()
