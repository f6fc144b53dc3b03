"""The training objective of the paper's recipe, and the baselines, over all stacks.

Per stack ``i`` of ``S`` the weight is ``2^i / 2^(S-1)`` (the last stack counts
most) times::

    landmark_weight * L(fused heatmaps, gt landmarks)        # STAR, or a baseline
  + map_weight      * AWing(point maps, target point maps)   # AAM, when the model has it
  + map_weight      * AWing(edge maps,  target edge maps)

``L`` is STAR (v2 or v1) on the fused heatmaps, or for baselines a coordinate
loss on their soft-argmax (``smoothl1``, ``l1``, ``l2``, ``wing``), or nothing
(``none``: the AAM maps alone).  The original's recipe is
``LossConfig()``: STAR v2, w = 1, smooth-L1, map weight 10.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import LossConfig
from ..heatmaps import soft_argmax, working_dtype
from .coord import L1Loss, L2Loss, SmoothL1Loss, WingLoss
from .heatmap import AWingLoss
from .star import STARLoss


class OnSoftArgmax(nn.Module):
    """A coordinate loss applied to the soft-argmax of heatmaps, so that every landmark loss
    of the recipe takes ``(heatmaps, landmarks)`` as STAR does."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, heatmaps: Tensor, landmarks: Tensor) -> Tensor:
        return self.loss(soft_argmax(heatmaps), landmarks.float())


def stack_weights(nstack: int) -> list[float]:
    """``2^i / 2^(nstack-1)`` for stacks 0..nstack-1."""
    return [2.0**i / 2.0 ** (nstack - 1) for i in range(nstack)]


class RecipeLoss(nn.Module):
    """Total training loss and its parts from a model output and the targets.

    ``forward(output, landmarks, pointmaps=None, edgemaps=None)`` takes the model's
    output (``heatmaps``, ``pointmaps``, ``edgemaps`` tuples per stack), ground truth
    landmarks (B, N, 2) normalised, and target maps (needed when the model has the
    AAM heads and ``map_weight > 0``).  Returns ``(total, parts)`` where ``parts``
    maps names like ``"landmark/3"`` to detached per-stack terms (unweighted).
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        self.config.validate()
        c = self.config
        self.landmark_loss: nn.Module | None
        if c.kind == "star":
            self.landmark_loss = STARLoss(w=c.star_w, dist=c.star_dist, version=2)
        elif c.kind == "star_v1":
            self.landmark_loss = STARLoss(w=c.star_w, dist=c.star_dist, version=1)
        elif c.kind == "none":
            self.landmark_loss = None
        else:
            coord = {"smoothl1": SmoothL1Loss, "l1": L1Loss, "l2": L2Loss, "wing": WingLoss}[c.kind]()
            self.landmark_loss = OnSoftArgmax(coord)
        self.map_loss = AWingLoss()

    @property
    def uses_maps(self) -> bool:
        return self.config.map_weight > 0

    def forward(
        self,
        output,
        landmarks: Tensor,
        pointmaps: Tensor | None = None,
        edgemaps: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        heatmaps = output.heatmaps
        nstack = len(heatmaps)
        has_maps = bool(output.pointmaps) and self.uses_maps
        if has_maps and (pointmaps is None or edgemaps is None):
            raise ValueError("the model has AAM heads and map_weight > 0: pass target point and edge maps")
        total = heatmaps[0].new_zeros((), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        if has_maps:  # every stack is scored against the same target maps
            dtype = working_dtype(output.pointmaps[0].dtype)
            point_terms = self.map_loss.target_terms(pointmaps, dtype)
            edge_terms = self.map_loss.target_terms(edgemaps, dtype)
        for i, w in enumerate(stack_weights(nstack)):
            if self.landmark_loss is not None:
                term = self.landmark_loss(heatmaps[i], landmarks)
                total = total + w * c.landmark_weight * term
                parts[f"landmark/{i}"] = term.detach()
            if has_maps:
                p = self.map_loss(output.pointmaps[i], pointmaps, point_terms)
                e = self.map_loss(output.edgemaps[i], edgemaps, edge_terms)
                total = total + w * c.map_weight * (p + e)
                parts[f"pointmap/{i}"] = p.detach()
                parts[f"edgemap/{i}"] = e.detach()
        return total, parts
