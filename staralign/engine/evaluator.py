"""Running a network over faces: the training loop's validation and the ``test`` command's evaluation.

Layers, each usable alone:

* ``predict_batch`` is one network call on a batch of crops: the last stack's
  landmarks, normalised, optionally averaged with the mirrored crop's (flip test).
  Validation and evaluation both predict through it.
* ``predict`` runs a model over a loader and returns per-sample landmarks in crop
  space (normalised, like the original tester) together with the crop matrices
  needed to map them back to the original image (:class:`~.scoring.Predictions`).
* ``evaluate_nme`` / ``evaluate_nmes`` are the training loop's validation: the last
  stack's mean NME, exact across processes.
* ``evaluate_model`` runs one network over a :class:`~staralign.data.testsets.TestSet`
  (the faces and their subsets, :mod:`staralign.data.testsets`) and scores it in crop
  or image space (:mod:`.scoring`): an :class:`~.scoring.EvalResult`.

Test mode never builds training targets (the original's loader draws point and
edge maps for every test face and throws them away).
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
from torch import nn

from ..data.testsets import TestSet
from ..data.transforms import network_input
from ..definitions import NORMS, LandmarkDefinition
from ..metrics import nme as nme_fn
from ..precision import autocast
from .distributed import all_gather_objects
from .scoring import SPACES, EvalResult, Predictions, errors_in_space

__all__ = [
    "default_micro_batch",
    "default_workers",
    "evaluate_model",
    "evaluate_nme",
    "evaluate_nmes",
    "flip_normalized_landmarks_torch",
    "make_loader",
    "predict",
    "predict_batch",
]

# Faces per network call on a CPU.  Measured with the full-size model on a shared 2-core
# machine (docs/evaluation.md): 32 at once falls out of cache; 4 to 8 are a little faster
# than 16 on idle cores but up to twice as slow when other jobs share them (more, smaller
# OpenMP regions per face).  16 is never far from the best.
CPU_MICRO_BATCH = 16


def flip_normalized_landmarks_torch(landmarks: torch.Tensor, definition: LandmarkDefinition) -> torch.Tensor:
    """Landmarks (..., N, 2) predicted on a horizontally mirrored crop, in normalised crop
    coordinates, mapped back to the crop (the image-pixel numpy flip is
    :func:`staralign.data.transforms.flip_matrix`).

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
            pred = 0.5 * (pred + flip_normalized_landmarks_torch(mirrored, definition))
    return pred


@functools.cache
def _accepts_all_stacks(model_class: type) -> bool:
    """Whether the class's forward takes ``all_stacks`` (ours do; wrappers and other nets may not)."""
    import inspect

    try:
        return "all_stacks" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


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
    parts = all_gather_objects(local)
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
    pred, gt, errors = errors_in_space(preds, test_set, definition, space, norm, input_size)
    subsets = {name: np.asarray(mask, bool)[preds.indices] for name, mask in test_set.subsets.items()}
    return EvalResult(label, definition, space, norm, flip_test, input_size, preds, pred, gt,
                      errors, subsets, seconds, checkpoint)
