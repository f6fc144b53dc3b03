"""Robust distance functions shared by the coordinate losses and STAR.

Each maps an error to a penalty.  ``*_of_sq`` forms take the *squared* error
(``e^2`` for a scalar projection, ``|e|^2`` for a point), which is how the
original code applies them: on a norm for coordinate losses, elementwise for
the projections in STAR v2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The original's floor under a squared distance before its square root.
SQRT_FLOOR = 1e-6


def smooth_l1_of_sq(sq: Tensor, scale: float = 0.01) -> Tensor:
    """Quadratic below ``scale``, linear above: ``0.5/s d^2`` if ``d^2 < s^2`` else ``d - s/2``."""
    d = sq.clamp(min=SQRT_FLOOR).sqrt()
    return torch.where(sq < scale * scale, (0.5 / scale) * sq, d - 0.5 * scale)


def wing_of_sq(sq: Tensor, omega: float = 0.01, epsilon: float = 2.0) -> Tensor:
    """Wing loss (Feng et al. 2018) on a distance: log-shaped below ``omega``, linear above."""
    d = sq.clamp(min=SQRT_FLOOR).sqrt()
    c = omega - omega * math.log(1 + omega / epsilon)
    return torch.where(d < omega, omega * torch.log1p(d / epsilon), d - c)


def elementwise(name: str, err: Tensor) -> Tensor:
    """Penalty of each element of ``err`` under the named distance (STAR v2's ``d``)."""
    if name == "smoothl1":
        return smooth_l1_of_sq(err * err)
    if name == "l1":
        return err.abs()
    if name == "l2":
        return err * err
    if name == "wing":
        return wing_of_sq(err * err)
    raise ValueError(f"unknown distance {name!r}; choose from smoothl1, l1, l2, wing")


DISTANCES = ("smoothl1", "l1", "l2", "wing")
