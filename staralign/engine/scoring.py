"""Scoring: a network's predictions on a test set -> per-landmark errors in one space -> NME, FR, AUC.

:class:`Predictions` is what a prediction pass (:func:`staralign.engine.evaluator.predict`)
hands over: normalised crop landmarks with the ground truth beside them, and the crop
matrices that take them back to the photo.  Two spaces, the two ways the original code scores:

* ``crop``: the prediction vs the clamped ground truth, both in normalised crop
  coordinates (the original ``tester.py``);
* ``image``: the prediction mapped back through the inverse crop vs the annotation's
  landmarks in photo pixels, unclamped (its ``evaluate.py``).

:func:`score` turns per-face NMEs into the full set's and every subset's
:func:`~staralign.metrics.summarize` (what the table and the JSON hold).

Only numpy is imported at the top: the ``test`` command's parser takes :data:`SPACES`
from here, and ``staralign --help`` must not load torch (:mod:`staralign.metrics` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..data.testsets import TestSet
    from ..definitions import LandmarkDefinition

__all__ = ["SPACES", "EvalResult", "Predictions", "crop_to_image_space", "errors_in_space", "score"]

SPACES = ("crop", "image")


@dataclass
class Predictions:
    """Per-sample results of :func:`~staralign.engine.evaluator.predict`, in dataset order."""

    indices: np.ndarray  # (M,) dataset indices
    pred: np.ndarray  # (M, N, 2) normalised crop coordinates
    gt: np.ndarray  # (M, N, 2) normalised crop coordinates (clamped, as the original)
    matrices: np.ndarray  # (M, 3, 3) image -> crop pixel transforms
    paths: list[str]


def crop_to_image_space(pred: np.ndarray, matrices: np.ndarray, input_size: int) -> np.ndarray:
    """Normalised crop landmarks (M, N, 2) -> original image pixels through each inverse crop."""
    from ..data.transforms import crop_to_image, denormalize_points

    pixels = denormalize_points(np.asarray(pred, np.float64), input_size)
    return crop_to_image(pixels, np.asarray(matrices, np.float64))


def errors_in_space(
    predictions: Predictions,
    test_set: TestSet,
    definition: LandmarkDefinition,
    space: str,
    norm: str,
    input_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pred, gt, errors)`` of ``predictions`` in ``space``: (M, N, 2) landmarks (normalised crop,
    or image pixels) and (M, N) point errors divided by the ``norm`` distance."""
    from ..metrics import point_errors

    if space == "crop":
        pred, gt = predictions.pred.astype(np.float64), predictions.gt.astype(np.float64)
    else:
        pred = crop_to_image_space(predictions.pred, predictions.matrices, input_size)
        gt = np.stack([test_set.annotations[i].landmarks for i in predictions.indices]).astype(np.float64) \
            if len(predictions.indices) else np.zeros((0, definition.num_points, 2))
    errors = point_errors(pred, gt, definition, norm) if len(pred) else np.zeros((0, definition.num_points))
    return pred, gt, np.asarray(errors, np.float64)


def score(
    nmes: Sequence[float] | np.ndarray,
    subsets: Mapping[str, np.ndarray],
    thresholds: Sequence[float],
    norm: str,
) -> dict:
    """The full set's :func:`~staralign.metrics.summarize`, with ``"subsets"``: the same for every masked subset."""
    from ..metrics import summarize

    values = np.asarray(nmes, np.float64).reshape(-1)
    out = summarize(values, thresholds, norm)
    out["subsets"] = {}
    for name, mask in subsets.items():
        m = np.asarray(mask, bool)
        if m.shape != values.shape:
            raise ValueError(f"subset {name!r}: mask of shape {m.shape} for {values.size} faces")
        out["subsets"][name] = summarize(values[m], thresholds, norm)
    return out


@dataclass
class EvalResult:
    """One network on one test set: per-landmark errors in the evaluated space, and all it
    took to get them (for reports: the crop-space predictions and crop matrices)."""

    label: str
    definition: LandmarkDefinition
    space: str
    norm: str
    flip_test: bool
    input_size: int
    predictions: Predictions  # crop space, normalised
    pred: np.ndarray  # (M, N, 2) in the evaluated space (normalised crop, or image pixels)
    gt: np.ndarray  # (M, N, 2) likewise
    errors: np.ndarray  # (M, N) point errors / normalising distance
    subsets: dict[str, np.ndarray]
    seconds: float
    checkpoint: str = ""

    @property
    def nmes(self) -> np.ndarray:
        """(M,) per-face NME."""
        return self.errors.mean(axis=1)

    def per_landmark(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(N,) mean normalised error of each landmark (over ``mask``'s faces, or all)."""
        errs = self.errors if mask is None else self.errors[np.asarray(mask, bool)]
        return errs.mean(axis=0) if len(errs) else np.full(self.errors.shape[1], np.nan)

    def metrics(self, thresholds: Sequence[float]) -> dict:
        """:func:`score` of this run."""
        return score(self.nmes, self.subsets, thresholds, self.norm)
