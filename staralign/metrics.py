"""Landmark metrics: NME under each normalisation, failure rate, AUC and the CED curve.

Inputs may be numpy arrays or torch tensors of shape (B, N, 2) in any common
unit (pixels or normalised); NME is unit-free.  Results come back as the same
kind of object (tensor on its device, or numpy array).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.integrate import simpson

from .definitions import NORMS, LandmarkDefinition, get_definition

__all__ = [
    "ced_curve", "fr_auc", "nme", "normalising_distance", "point_errors", "summarize",
]

AUC_STEP = 1e-4


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x.detach(), True
    return torch.from_numpy(np.array(x, dtype=np.float64)), False


def normalising_distance(gt, definition: str | LandmarkDefinition, norm: str = "default"):
    """Per-sample distance that divides the errors: (B,) from ground truth (B, N, 2).

    ``ocular``/``pupil``/``default`` use the definition's index groups (a group of
    several points is averaged first, as the original does for 300W pupils);
    ``box`` uses ``sqrt(width * height)`` of the ground-truth landmarks' bounding box.
    """
    g, is_tensor = _as_tensor(gt)
    if norm == "box":
        span = g.amax(dim=-2) - g.amin(dim=-2)
        d = torch.sqrt(span[..., 0] * span[..., 1])
    else:
        if norm not in NORMS:
            raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")
        idx = get_definition(definition).norm_indices(norm)
        left = g[..., list(idx.left), :].mean(dim=-2)
        right = g[..., list(idx.right), :].mean(dim=-2)
        d = torch.linalg.vector_norm(left - right, dim=-1)
    return d if is_tensor else d.numpy()


def point_errors(pred, gt, definition: str | LandmarkDefinition, norm: str = "default"):
    """Per-landmark error divided by the normalising distance: (B, N)."""
    p, is_tensor = _as_tensor(pred)
    g, _ = _as_tensor(gt)
    g = g.to(p.dtype)
    dist = torch.as_tensor(normalising_distance(g, definition, norm))
    err = torch.linalg.vector_norm(p - g, dim=-1) / dist.to(p.device, p.dtype).unsqueeze(-1)
    return err if is_tensor else err.numpy()


def nme(pred, gt, definition: str | LandmarkDefinition, norm: str = "default"):
    """Normalised mean error of each sample: (B,)."""
    err = point_errors(pred, gt, definition, norm)
    return err.mean(-1) if isinstance(err, torch.Tensor) else err.mean(axis=-1)


def ced_curve(nmes, threshold: float, step: float = AUC_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: thresholds ``xs`` and the fraction of samples with NME <= x.

    The grid is the original's ``arange(0, threshold + step, step)``.
    """
    values = np.asarray(nmes.detach().cpu() if isinstance(nmes, torch.Tensor) else nmes, np.float64)
    values = values.reshape(-1)
    if values.size == 0:
        raise ValueError("cannot compute a CED curve from zero samples")
    xs = np.arange(0, threshold + step, step)
    ys = np.searchsorted(np.sort(values), xs, side="right") / float(values.size)
    return xs, ys


def fr_auc(nmes, threshold: float = 0.1, step: float = AUC_STEP, rounded: bool = True) -> tuple[float, float]:
    """Failure rate (share of samples with NME above ``threshold``) and area under the CED.

    As the original: Simpson's rule over the CED on its step grid, divided by the
    threshold, rounded to 4 (FR) and 6 (AUC) decimals unless ``rounded=False``.
    """
    xs, ys = ced_curve(nmes, threshold, step)
    fr = 1.0 - float(ys[-1])
    auc = float(simpson(ys, x=xs)) / threshold
    if rounded:
        return round(fr, 4), round(auc, 6)
    return fr, auc


def summarize(nmes: Sequence[float] | np.ndarray, thresholds: Sequence[float], norm: str = "default") -> dict:
    """NME, FR and AUC of one set of faces, ready for JSON.

    ``fr``/``auc``/``threshold`` are those of the first threshold; ``by_threshold``
    holds every threshold's (keys as ``f"{t:g}"``).  An empty set gives ``None``s.
    """
    if not thresholds:
        raise ValueError("at least one FR/AUC threshold is needed")
    values = np.asarray(nmes, np.float64).reshape(-1)
    n = int(values.size)
    by: dict[str, dict] = {}
    for t in thresholds:
        fr, auc = fr_auc(values, float(t)) if n else (None, None)
        by[f"{t:g}"] = {"fr": fr, "auc": auc}
    first = by[f"{thresholds[0]:g}"]
    return {"nme": float(values.mean()) if n else None, "fr": first["fr"], "auc": first["auc"],
            "threshold": float(thresholds[0]), "norm": norm, "count": n, "by_threshold": by}
