"""The landmark dataset: annotation rows -> normalised crops, landmarks and training targets.

A sample is a pure function of ``(seed, epoch, index)``: every random choice comes
from ``numpy.random.default_rng([seed, epoch, index])`` (texture from a second
stream ``[seed, epoch, index, 1]``), so a sample can be reproduced anywhere (any
worker, any number of workers) and the engine calls
:meth:`LandmarkDataset.set_epoch` before each epoch to get fresh augmentation;
the epoch lives in shared memory, so persistent workers follow it.

Train mode (the original's): with probability ``aug_prob``, flip (p 0.5), random
similarity after the crop, warp, texture augmentation; otherwise, and in test
mode, just crop and warp.

Each sample is a dict:

``image``      (3, S, S) float32, BGR, ``(pixel - 127.5) / 127.5``; with ``image_dtype="uint8"``
               the 8-bit pixels, normalised later by :func:`~.transforms.normalize_image` (a quarter of
               the bytes to send from a worker; the result is the same to the last bit)
``landmarks``  (N, 2) float32 in [-1, 1] (align_corners=False, clamped)
``points``     (N, 2) float32 crop pixels, not clamped (device-side targets use them)
``matrix``     (3, 3) float32, original image pixels -> crop pixels (see below)
``tags``       (T,) int64 attribute flags (T = 0 when the file has none)
``index``      int, ``image_path`` str, ``flipped`` bool
``pointmaps``  (N, H, H) float32, only with ``targets="worker"``
``edgemaps``   (E, H, H) float32, with ``targets="worker"`` or ``"mixed"`` (point maps are cheap
               to build on a GPU and costly to send, edge maps the other way round)

``targets`` is where point/edge map targets are built, in ``data.targets``' own words
(:data:`~staralign.config.TARGET_PLACEMENTS`, explained in :mod:`staralign.engine.loaders`);
this dataset builds what the placement gives the loader workers, and nothing with
``"device"``, where the training step builds the maps a batch lacks.

``matrix`` maps the annotation's landmark coordinates to the crop; when the sample
was flipped it includes the landmark flip (and the landmarks were permuted by the
flip pairs), so ``crop_to_image(points, matrix)`` gives image coordinates of the
permuted points.  In test mode there is no flip and it is just the crop matrix,
which is what evaluation and inference invert.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, default_collate

from ..config import TARGET_PLACEMENTS
from ..definitions import LandmarkDefinition, get_definition
from .annotations import Annotation, AnnotationError, AnnotationFile, read_annotations, resolve_image_path
from .images import read_image
from .targets.edges import edge_maps
from .targets.points import point_maps
from .transforms import (
    GeometryAugment,
    TextureAugment,
    apply_texture,
    crop_matrix,
    flip_matrix,
    image_to_tensor,
    mirror_matrix,
    normalize_points,
    random_geometry_matrix,
    transform_points,
    warp_image,
)

__all__ = [
    "DataWarning",
    "LandmarkDataset",
    "collate_samples",
    "find_annotation_file",
    "sample_rng",
    "worker_init_fn",
]

# The placements a dataset takes: data.targets' own, less "auto" (the engine resolves it per device).
WORKER_PLACEMENTS = tuple(p for p in TARGET_PLACEMENTS if p != "auto")
IMAGE_DTYPES = ("float32", "uint8")


class DataWarning(UserWarning):
    """Something in the data was skipped or repaired; the message says what and where."""


def sample_rng(seed: int, epoch: int, index: int, stream: int | None = None) -> np.random.Generator:
    """The generator behind sample ``index`` of ``epoch``: independent of worker layout.
    ``stream`` picks a further independent stream of the same sample (1: texture)."""
    key = [int(seed), int(epoch), int(index)]
    return np.random.default_rng(key if stream is None else [*key, int(stream)])


def find_annotation_file(annot_dir: str | os.PathLike, definition_name: str, filename: str) -> Path:
    """``ANNOT_DIR/filename``, or the original's layout ``ANNOT_DIR/<DEFINITION>/filename``."""
    root = Path(annot_dir)
    candidates = [root / filename]
    for name in dict.fromkeys([definition_name, definition_name.upper(), definition_name.lower()]):
        candidates.append(root / name / filename)
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"annotation file {filename!r} not found; looked for {tried}")


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker set-up: one torch thread per worker (the loader already runs one
    worker per core; nested thread pools only contend).

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked
    worker deadlocks when the parent process had used OpenCV's thread pool (measured:
    3 hangs in 10 forks).  To keep workers single-threaded, call ``cv2.setNumThreads(1)``
    in the parent before the workers start, as ``staralign bench data`` does.
    """
    torch.set_num_threads(1)


class LandmarkDataset(Dataset):
    """Faces from a STAR ``.tsv`` file (or a list of :class:`Annotation`), see the module doc."""

    def __init__(
        self,
        annotations: str | os.PathLike | AnnotationFile | Sequence[Annotation],
        image_dir: str | os.PathLike | None,
        definition: str | LandmarkDefinition,
        train: bool,
        input_size: int = 256,
        heatmap_size: int = 64,
        seed: int = 0,
        targets: str = "worker",
        skip_bad_rows: bool = False,
        aug_prob: float = 1.0,
        geometry: GeometryAugment | None = None,
        texture: TextureAugment | None = None,
        sigma: float = 1.5,
        image_dtype: str = "float32",
    ) -> None:
        if targets not in WORKER_PLACEMENTS:
            raise ValueError(f"targets must be one of {WORKER_PLACEMENTS}, got {targets!r}")
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
        self.image_dtype = image_dtype
        if not 0.0 <= aug_prob <= 1.0:
            raise ValueError(f"aug_prob must be in [0, 1], got {aug_prob}")
        self.definition = get_definition(definition)
        self.image_dir = None if image_dir is None else str(image_dir)
        self.train, self.input_size, self.heatmap_size = bool(train), int(input_size), int(heatmap_size)
        self.seed = int(seed)
        # Shared memory, so persistent DataLoader workers see set_epoch calls made in the
        # main process (each worker holds its own copy of the dataset object).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.targets, self.aug_prob, self.sigma = targets, float(aug_prob), float(sigma)
        self.geometry = geometry if geometry is not None else GeometryAugment()
        self.texture = texture if texture is not None else TextureAugment()
        self.skipped: list[AnnotationError] = []
        self.source = ""
        if isinstance(annotations, (str, os.PathLike)):
            annotations = read_annotations(annotations, num_points=self.definition.num_points,
                                           skip_bad_rows=skip_bad_rows)
        if isinstance(annotations, AnnotationFile):
            self.source = str(annotations.path)
            self.skipped = list(annotations.skipped)
            items = list(annotations.annotations)
        else:
            items = list(annotations)
        for a in items:
            if a.num_points != self.definition.num_points:
                raise AnnotationError(a.source or self.source, a.line, "landmarks_target",
                                      f"{a.num_points} points, but definition {self.definition.name} "
                                      f"has {self.definition.num_points}")
        self.items = items
        if self.skipped:
            first = self.skipped[0]
            warnings.warn(f"{self.source}: skipped {len(self.skipped)} bad row(s); first: {first}",
                          DataWarning, stacklevel=2)
        self._perm = np.array(self.definition.flip_permutation(), np.int64)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation of every sample depend on ``epoch``: call it before iterating
        the loader for that epoch (workers, persistent ones included, see it)."""
        self._epoch.fill_(int(epoch))

    def image_path(self, index: int) -> Path:
        return resolve_image_path(self.items[index].image_path, self.image_dir)

    def load_image(self, index: int, path: Path | None = None) -> np.ndarray:
        a = self.items[index]
        return read_image(self.image_path(index) if path is None else path, a.source or self.source, a.line)

    def geometry_of(
        self, index: int, image_width: int, epoch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """(image warp matrix, landmark matrix, flipped, augmented) of a sample (of ``epoch``,
        by default the current one).

        Split from :meth:`__getitem__` so tests and tools can see the geometry without
        decoding the image.
        """
        a = self.items[index]
        size = self.input_size
        rng = sample_rng(self.seed, self.epoch if epoch is None else epoch, index)
        if self.train and rng.random() < self.aug_prob:
            flipped = rng.random() < 0.5 and bool(self.definition.flip_pairs)
            cw, ch = a.center
            if flipped:
                cw = image_width + self.definition.flip_x_offset - cw
            geo = random_geometry_matrix(rng, size, self.geometry)
            m = geo @ crop_matrix(a.scale, cw, ch, size)
            if flipped:
                return (m @ mirror_matrix(image_width),
                        m @ flip_matrix(image_width, self.definition.flip_x_offset), True, True)
            return m, m, False, True
        m = crop_matrix(a.scale, a.center[0], a.center[1], size)
        return m, m, False, False

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        a = self.items[index]
        path = self.image_path(index)
        image = self.load_image(index, path)
        size = self.input_size
        epoch = self.epoch  # shared memory: read once
        image_m, point_m, flipped, augment = self.geometry_of(index, image.shape[1], epoch)
        landmarks = a.landmarks[self._perm] if flipped else a.landmarks
        point_m = point_m.astype(np.float32, copy=False)
        points = transform_points(landmarks.astype(np.float32, copy=False), point_m).astype(np.float32, copy=False)
        crop = warp_image(image, image_m, size)
        if augment:
            # A second stream of the same sample: texture draws never shift the geometry's.
            crop = apply_texture(crop, sample_rng(self.seed, epoch, index, 1), self.texture)
        sample: dict[str, Any] = {
            "image": image_to_tensor(crop, normalize=self.image_dtype == "float32"),
            "landmarks": torch.from_numpy(normalize_points(points, size).astype(np.float32, copy=False)),
            "points": torch.from_numpy(points),
            "matrix": torch.from_numpy(point_m),
            "tags": torch.tensor(a.tags, dtype=torch.int64),
            "index": index,
            "image_path": str(path),
            "flipped": flipped,
        }
        if self.targets == "worker":
            sample["pointmaps"] = torch.from_numpy(point_maps(points, size, self.heatmap_size, self.sigma))
        if self.targets in ("worker", "mixed"):
            sample["edgemaps"] = torch.from_numpy(edge_maps(points, self.definition, size, self.heatmap_size))
        return sample


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch with torch's ``default_collate`` (tensors stacked --
    in a worker, straight into shared memory --, ``index`` int64, ``flipped`` bool,
    ``image_path`` a list), and ``tags`` padded with -1 where their lengths differ."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch = default_collate([{k: v for k, v in s.items() if k != "tags"} for s in samples])
    if "tags" in samples[0]:
        batch["tags"] = pad_sequence([s["tags"] for s in samples], batch_first=True, padding_value=-1)
    return batch
