"""Losses: STAR on heatmaps, AWing on point/edge maps, and coordinate baselines."""

from .coord import L1Loss, L2Loss, SmoothL1Loss, WingLoss
from .heatmap import AWingLoss
from .star import STARLoss

__all__ = ["AWingLoss", "L1Loss", "L2Loss", "STARLoss", "SmoothL1Loss", "WingLoss"]
