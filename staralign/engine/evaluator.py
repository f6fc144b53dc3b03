"""Batched, device-aware prediction over a test set, and the paper's metrics from it.

Layers, each usable alone:

* ``predict`` runs a model over a loader and returns per-sample landmarks in crop
  space (normalised, like the original tester) together with the crop matrices
  needed to map them back to the original image.  ``evaluate_nme`` is the
  training loop's validation: the last stack's mean NME, exact across processes.
* ``load_test_set`` reads the faces to score and their named subsets: WFLW's six
  attribute tags, or 300W's common / challenge files (each face read once).
* ``evaluate_model`` runs one network over a :class:`TestSet` and returns an
  :class:`EvalResult`: per-landmark errors in crop space (the original
  ``tester.py``: prediction vs clamped ground truth, normalised crop coordinates)
  or image space (its ``evaluate.py``: the prediction mapped back through the
  inverse crop vs the annotation's landmarks, unclamped).
* ``metrics.summarize`` / ``score`` turn per-sample NMEs into NME, FR and AUC per
  threshold, for the full set and every subset (what the report and JSON hold).

Test mode never builds training targets (the original's loader draws point and
edge maps for every test face and throws them away).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.annotations import WFLW_TAGS, Annotation, read_annotations
from ..data.transforms import network_input
from ..definitions import LandmarkDefinition, get_definition
from ..metrics import NORMS, point_errors, summarize
from ..metrics import nme as nme_fn
from ..precision import autocast
from . import distributed as D

__all__ = [
    "SPACES",
    "EvalResult",
    "Predictions",
    "TestSet",
    "crop_to_image_space",
    "default_micro_batch",
    "default_workers",
    "evaluate_model",
    "evaluate_nme",
    "evaluate_nmes",
    "flip_landmarks",
    "load_test_set",
    "make_loader",
    "predict",
    "predict_batch",
    "score",
    "tag_subsets",
]

SPACES = ("crop", "image")
FULL = "full"
# 300W's converter writes these next to test.tsv (which is their union).
COMMON_FILE, CHALLENGE_FILE, TEST_FILE = "test_common.tsv", "test_challenge.tsv", "test.tsv"
# Faces per network call on a CPU.  Measured with the full-size model on a shared 2-core
# machine (docs/evaluation.md): 32 at once falls out of cache; 4 to 8 are a little faster
# than 16 on idle cores but up to twice as slow when other jobs share them (more, smaller
# OpenMP regions per face).  16 is never far from the best.
CPU_MICRO_BATCH = 16



def flip_landmarks(landmarks: torch.Tensor, definition: LandmarkDefinition) -> torch.Tensor:
    """Landmarks predicted on a horizontally mirrored crop, mapped back to the crop.

    In normalised align-corners=False coordinates a mirror is exactly ``x -> -x``;
    the flip pairs then swap left and right points.
    """
    out = landmarks[..., definition.flip_permutation(), :].clone()
    out[..., 0] = -out[..., 0]
    return out


def _forward(model: nn.Module, images: torch.Tensor, kwargs: dict, micro_batch: int | None) -> torch.Tensor:
    if not micro_batch or images.shape[0] <= micro_batch:
        return model(images, **kwargs).landmarks.float()
    return torch.cat([model(chunk, **kwargs).landmarks.float() for chunk in images.split(micro_batch)])


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    images: torch.Tensor,
    definition: LandmarkDefinition,
    flip_test: bool = False,
    amp: str = "none",
    micro_batch: int | None = None,
) -> torch.Tensor:
    """Last-stack landmarks (B, N, 2), normalised, optionally averaged with the mirrored image's.

    ``micro_batch`` splits the network call into chunks (CPUs run the full-size model
    faster in moderate batches; the result is the same).
    """
    kwargs = {"all_stacks": False} if _accepts_all_stacks(type(model)) else {}
    with autocast(images.device, amp):
        pred = _forward(model, images, kwargs, micro_batch)
        if flip_test:
            mirrored = _forward(model, torch.flip(images, dims=[-1]), kwargs, micro_batch)
            pred = 0.5 * (pred + flip_landmarks(mirrored, definition))
    return pred


@functools.cache
def _accepts_all_stacks(model_class: type) -> bool:
    """Whether the class's forward takes ``all_stacks`` (ours do; wrappers and other nets may not)."""
    import inspect

    try:
        return "all_stacks" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class Predictions:
    """Per-sample results of ``predict``, in dataset order."""

    indices: np.ndarray  # (M,) dataset indices
    pred: np.ndarray  # (M, N, 2) normalised crop coordinates
    gt: np.ndarray  # (M, N, 2) normalised crop coordinates (clamped, as the original)
    matrices: np.ndarray  # (M, 3, 3) image -> crop pixel transforms
    paths: list[str]


def _progress_bar(loader, enabled: bool):
    if not enabled:
        return None
    from ..progress import progress

    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    # A bar on a terminal, plain lines when stderr is a file or pipe.
    return progress(total, "evaluating", "face")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader,
    definition: LandmarkDefinition,
    device: torch.device,
    flip_test: bool = False,
    amp: str = "none",
    progress: bool = False,
    micro_batch: int | None = None,
    channels_last: bool = False,
) -> Predictions:
    """Run ``model`` over ``loader`` (test-mode dataset batches); gathered across processes.

    ``channels_last`` feeds NHWC images (pair it with a channels-last model: faster
    convolutions on CPUs and tensor cores).
    """
    was_training = model.training
    model.eval()
    idx, preds, gts, mats, paths = [], [], [], [], []
    bar = _progress_bar(loader, progress)
    try:
        for batch in loader:
            images = network_input(batch["image"].to(device, non_blocking=True), channels_last)
            pred = predict_batch(model, images, definition, flip_test, amp, micro_batch)
            preds.append(pred.cpu().numpy())
            gts.append(batch["landmarks"].numpy())
            idx.append(np.asarray(batch["index"]))
            mats.append(np.asarray(batch["matrix"], dtype=np.float64))
            paths.extend(batch["image_path"])
            if bar is not None:
                bar.update(len(pred))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    local = (
        np.concatenate(idx) if idx else np.zeros(0, np.int64),
        np.concatenate(preds) if preds else np.zeros((0, definition.num_points, 2), np.float32),
        np.concatenate(gts) if gts else np.zeros((0, definition.num_points, 2), np.float32),
        np.concatenate(mats) if mats else np.zeros((0, 3, 3)),
        paths,
    )
    parts = D.all_gather_objects(local)
    order_idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(order_idx, kind="stable")
    all_paths = [x for p in parts for x in p[4]]
    return Predictions(
        indices=order_idx[order],
        pred=np.concatenate([p[1] for p in parts])[order],
        gt=np.concatenate([p[2] for p in parts])[order],
        matrices=np.concatenate([p[3] for p in parts])[order],
        paths=[all_paths[i] for i in order],
    )


@torch.no_grad()
def evaluate_nme(
    model: nn.Module,
    loader,
    definition: LandmarkDefinition,
    device: torch.device,
    amp: str = "none",
    norm: str = "default",
) -> float:
    """Mean NME of the last stack over the (sharded) loader, reduced across processes."""
    return evaluate_nmes({"model": model}, loader, definition, device, amp, norm)["model"]


@torch.no_grad()
def evaluate_nmes(
    models: dict[str, nn.Module],
    loader,
    definition: LandmarkDefinition,
    device: torch.device,
    amp: str = "none",
    norm: str = "default",
    channels_last: bool = False,
) -> dict[str, float]:
    """:func:`evaluate_nme` of several models (e.g. a model and its EMA) in one pass over the
    loader: each batch is read, decoded and moved to the device once (``channels_last`` for
    channels-last models)."""
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    total = torch.zeros(len(models), 2, dtype=torch.float64, device=device)
    for batch in loader:
        images = network_input(batch["image"].to(device, non_blocking=True), channels_last)
        gt = batch["landmarks"].to(device).double()
        for k, m in enumerate(models.values()):
            errs = nme_fn(predict_batch(m, images, definition, False, amp).double(), gt, definition, norm)
            total[k, 0] += errs.sum()
            total[k, 1] += errs.numel()
    for name, m in models.items():
        m.train(modes[name])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    nmes = (total[:, 0] / total[:, 1].clamp(min=1)).tolist()
    return dict(zip(models, nmes, strict=True))


# --------------------------------------------------------------------------- test sets


def tag_subsets(annotations: Sequence[Annotation]) -> dict[str, np.ndarray]:
    """Boolean masks of the attribute subsets, from the rows' 0/1 tags.

    Six tags are WFLW's (pose, expression, illumination, make-up, occlusion, blur);
    any other count is named ``tag0``, ``tag1``, ...  A row without tags is in none.
    """
    width = max((len(a.tags) for a in annotations), default=0)
    if width == 0:
        return {}
    flags = np.zeros((len(annotations), width), bool)
    for i, a in enumerate(annotations):
        flags[i, :len(a.tags)] = np.asarray(a.tags, bool)
    names = WFLW_TAGS if width == len(WFLW_TAGS) else tuple(f"tag{k}" for k in range(width))
    return {name: flags[:, k] for k, name in enumerate(names)}


@dataclass
class TestSet:
    """The faces to score, read once, and named subsets of them (boolean masks).

    ``full_first``: where the full set goes in tables (WFLW lists it first, 300W's
    papers list common, challenge, then full).
    """

    __test__ = False  # not a pytest test class

    annotations: list[Annotation]
    image_dir: str | None
    files: list[str]
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    full_first: bool = True

    def __len__(self) -> int:
        return len(self.annotations)

    def rows(self) -> list[str]:
        """Names of the reported sets in display order, ``"full"`` included."""
        names = list(self.subsets)
        return [FULL, *names] if self.full_first else [*names, FULL]

    def dataset(self, definition: LandmarkDefinition, input_size: int):
        """A test-mode dataset of these faces (no augmentation, no training targets)."""
        from ..data.dataset import LandmarkDataset

        return LandmarkDataset(self.annotations, self.image_dir, definition, train=False,
                               input_size=input_size, heatmap_size=max(1, input_size // 4), targets="device")


def _find(annot_dir: str | os.PathLike | None, definition: LandmarkDefinition, name: str) -> Path | None:
    from ..data.dataset import find_annotation_file

    if annot_dir is None:
        return None
    try:
        return find_annotation_file(annot_dir, definition.name, name)
    except FileNotFoundError:
        return None


def _read(path: Path, definition: LandmarkDefinition) -> list[Annotation]:
    return list(read_annotations(path, num_points=definition.num_points).annotations)


def load_test_set(
    definition: str | LandmarkDefinition,
    annot_dir: str | os.PathLike | None,
    image_dir: str | os.PathLike | None,
    test_file: str | os.PathLike | None = None,
) -> TestSet:
    """The test faces: ``test_file`` (a name under ``annot_dir``, or a path), else 300W's
    ``test_common.tsv`` + ``test_challenge.tsv`` when both exist, else ``test.tsv``.

    Raises ``FileNotFoundError`` naming what was looked for, and
    :class:`~staralign.data.annotations.AnnotationError` for bad rows (including a
    point count that does not match ``definition``).
    """
    d = get_definition(definition)
    img = None if image_dir is None else str(image_dir)
    if test_file is not None:
        given = Path(test_file)
        path = None if given.is_absolute() else _find(annot_dir, d, str(test_file))
        if path is None and given.is_file():
            path = given
        if path is None:
            where = f" (nor under {annot_dir})" if annot_dir is not None else ""
            raise FileNotFoundError(f"test file {str(test_file)!r} not found{where}")
        anns = _read(path, d)
        return TestSet(anns, img, [str(path)], tag_subsets(anns))
    if annot_dir is None:
        raise FileNotFoundError("no test file: give an annotation directory or a test file")
    common, challenge = _find(annot_dir, d, COMMON_FILE), _find(annot_dir, d, CHALLENGE_FILE)
    if common is not None and challenge is not None:
        a, b = _read(common, d), _read(challenge, d)
        anns = a + b
        subsets = {"common": np.arange(len(anns)) < len(a), "challenge": np.arange(len(anns)) >= len(a)}
        subsets.update(tag_subsets(anns))
        return TestSet(anns, img, [str(common), str(challenge)], subsets, full_first=False)
    path = _find(annot_dir, d, TEST_FILE)
    if path is None:
        raise FileNotFoundError(f"no {TEST_FILE} (or {COMMON_FILE} + {CHALLENGE_FILE}) in {annot_dir} "
                                f"or {Path(annot_dir) / d.name}")
    anns = _read(path, d)
    return TestSet(anns, img, [str(path)], tag_subsets(anns))


# --------------------------------------------------------------------------- metrics


def score(
    nmes: Sequence[float] | np.ndarray,
    subsets: Mapping[str, np.ndarray],
    thresholds: Sequence[float],
    norm: str,
) -> dict:
    """The full set's :func:`~staralign.metrics.summarize`, with ``"subsets"``: the same for every masked subset."""
    values = np.asarray(nmes, np.float64).reshape(-1)
    out = summarize(values, thresholds, norm)
    out["subsets"] = {}
    for name, mask in subsets.items():
        m = np.asarray(mask, bool)
        if m.shape != values.shape:
            raise ValueError(f"subset {name!r}: mask of shape {m.shape} for {values.size} faces")
        out["subsets"][name] = summarize(values[m], thresholds, norm)
    return out


def crop_to_image_space(pred: np.ndarray, matrices: np.ndarray, input_size: int) -> np.ndarray:
    """Normalised crop landmarks (M, N, 2) -> original image pixels through each inverse crop."""
    from ..data.transforms import crop_to_image, denormalize_points

    pixels = denormalize_points(np.asarray(pred, np.float64), input_size)
    return crop_to_image(pixels, np.asarray(matrices, np.float64))


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


def default_workers(device: torch.device) -> int:
    """Loader processes: none on a CPU (the network needs every core, and decoding is a
    small fraction of its time), up to 8 beside a GPU."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def default_micro_batch(device: torch.device) -> int:
    """Faces per network call: ``CPU_MICRO_BATCH`` on a CPU; 0, the whole batch, on a GPU."""
    return CPU_MICRO_BATCH if device.type == "cpu" else 0


def make_loader(dataset, batch_size: int, workers: int, device: torch.device):
    """A test-order DataLoader of ``dataset`` (one-threaded workers, pinned memory beside a GPU)."""
    from torch.utils.data import DataLoader

    from ..data.dataset import collate_samples, worker_init_fn

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_samples, pin_memory=device.type == "cuda",
                      worker_init_fn=worker_init_fn if workers > 0 else None,
                      prefetch_factor=4 if workers > 0 else None)


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def evaluate_model(
    model: nn.Module,
    test_set: TestSet,
    definition: LandmarkDefinition | None = None,
    device: torch.device | str = "cpu",
    *,
    space: str = "crop",
    norm: str = "default",
    flip_test: bool = False,
    amp: str = "none",
    batch_size: int = 32,
    workers: int | None = None,
    micro_batch: int | None = None,
    channels_last: bool = True,
    input_size: int | None = None,
    progress: bool = False,
    label: str = "model",
    checkpoint: str = "",
) -> EvalResult:
    """Predict every face of ``test_set`` and measure the errors in ``space``.

    ``crop``: prediction vs the clamped normalised crop landmarks (the original
    tester).  ``image``: the prediction mapped back through the inverse crop vs the
    annotation's original landmarks, unclamped (the original ``evaluate.py``).
    ``definition`` and ``input_size`` default to the model's; ``workers`` and
    ``micro_batch`` (None) to :func:`default_workers` / :func:`default_micro_batch`
    (``micro_batch=0``: the whole batch in one call).
    ``channels_last`` runs the network in NHWC (the model is converted back after).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    definition = definition if definition is not None else model.definition
    if input_size is None:
        input_size = int(model.config.input_size)
    if workers is None:
        workers = default_workers(device)
    if micro_batch is None:
        micro_batch = default_micro_batch(device)
    dataset = test_set.dataset(definition, input_size)
    loader = make_loader(dataset, batch_size, workers, device)
    convert = channels_last and not _is_channels_last(model)
    if convert:
        model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    try:
        preds = predict(model, loader, definition, device, flip_test, amp, progress, micro_batch, channels_last)
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - t0
    if space == "crop":
        pred, gt = preds.pred.astype(np.float64), preds.gt.astype(np.float64)
    else:
        pred = crop_to_image_space(preds.pred, preds.matrices, input_size)
        gt = np.stack([test_set.annotations[i].landmarks for i in preds.indices]).astype(np.float64) \
            if len(preds.indices) else np.zeros((0, definition.num_points, 2))
    errors = point_errors(pred, gt, definition, norm) if len(pred) else np.zeros((0, definition.num_points))
    subsets = {name: np.asarray(mask, bool)[preds.indices] for name, mask in test_set.subsets.items()}
    return EvalResult(label, definition, space, norm, flip_test, input_size, preds, pred, gt,
                      np.asarray(errors, np.float64), subsets, seconds, checkpoint)
