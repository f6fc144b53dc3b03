"""STAR loss: Self-adaptive ambiguity reduction (Zhou et al., CVPR 2023).

Each predicted heatmap is read as a 2-D distribution.  Its covariance's
eigenvectors give a *normal* direction (least spread) and a *tangent* direction
(most spread: the ambiguous one, e.g. along the jaw).  The error between the
ground truth and the heatmap mean is projected on both, each projection scaled
by ``1 / sqrt(eigenvalue + eps)`` so error along the ambiguous direction costs
less, and ``w * (|l1| + |l2|)`` keeps the distribution from spreading to hide
error.

Differences from the original, none of which change its numbers:

* the 2x2 eigen-decomposition is closed form on the device (the original copies
  every covariance to the CPU for ``torch.linalg.eigh`` each step);
* moments are computed from marginals (see ``staralign.heatmaps``);
* half-precision input is promoted to fp32 for the maths, and eigenvalues that
  rounding pushes below zero are clamped to 0 (the covariance is PSD), so the
  loss and its gradient stay finite on degenerate maps;
* ``dist="wing"`` works (the original's crashes).

``min_eigenvalue`` optionally floors the eigenvalues further; the default 0
keeps parity with the original.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..heatmaps import COV_EPSILON, heatmap_moments
from .distances import DISTANCES, elementwise, smooth_l1_of_sq, wing_of_sq


class STARLoss(nn.Module):
    """STAR loss on raw heatmaps (B, N, H, W) against normalised ground truth (B, N, 2).

    Args:
        w: weight of the eigenvalue restriction ``|l1| + |l2|``.
        dist: distance on the scaled projections: ``smoothl1`` (scale 0.01), ``l1``,
            ``l2`` or ``wing``.
        version: 2 (default, the original recipe's ``STARLoss_v2``: each projection
            through ``dist``, then scaled) or 1 (the projections scaled first and
            ``dist`` applied to the resulting 2-vector).
        eps: added to eigenvalues before the square root (the original's 1e-5).
        min_eigenvalue: optional floor on eigenvalues; 0 keeps parity.
    """

    def __init__(
        self,
        w: float = 1.0,
        dist: str = "smoothl1",
        version: int = 2,
        eps: float = COV_EPSILON,
        min_eigenvalue: float = 0.0,
    ) -> None:
        super().__init__()
        if dist not in DISTANCES:
            raise ValueError(f"unknown STAR distance {dist!r}; choose from {', '.join(DISTANCES)}")
        if version not in (1, 2):
            raise ValueError(f"STAR version must be 1 or 2, got {version!r}")
        if min_eigenvalue < 0:
            raise ValueError("min_eigenvalue must be >= 0")
        self.w, self.dist, self.version = float(w), dist, version
        self.eps, self.min_eigenvalue = eps, float(min_eigenvalue)

    def extra_repr(self) -> str:
        return f"w={self.w}, dist={self.dist!r}, version={self.version}"

    def forward(self, heatmaps: Tensor, gt: Tensor) -> Tensor:
        moments = heatmap_moments(heatmaps, eps=self.eps)
        evals = moments.eigenvalues.clamp(min=self.min_eigenvalue)
        err = gt.to(moments.mean.dtype) - moments.mean  # (B, N, 2)
        # Projections on the eigenvectors (columns): [normal, tangent].
        proj = torch.einsum("bnik,bni->bnk", moments.eigenvectors, err)
        scale = torch.rsqrt(evals + self.eps)
        eigen_penalty = evals.abs().sum(-1)
        if self.version == 2:
            trans = (elementwise(self.dist, proj) * scale).sum(-1)
            loss = (trans + self.w * eigen_penalty).mean()
        else:
            scaled = proj * scale
            sq = scaled.pow(2).sum(-1)
            if self.dist == "smoothl1":
                trans = smooth_l1_of_sq(sq).mean()
            elif self.dist == "wing":
                trans = wing_of_sq(sq).mean()
            else:
                trans = elementwise(self.dist, scaled).mean()
            loss = trans + self.w * eigen_penalty.mean()
        return loss
