"""The training and validation loaders, and where point/edge map targets are built.

Where the maps are built is ``data.targets``, in one vocabulary
(:data:`staralign.config.TARGET_PLACEMENTS`) that the config, the dataset and this module share:

``"worker"``  both maps in the loader workers (they run beside a CPU step)
``"mixed"``   edge maps in the workers (a rasteriser: slow on a GPU, small to send), point maps
              on the device (one fused kernel there, but N maps a sample to send)
``"device"``  both on the device
``"auto"``    resolved here (:func:`resolve_targets`): mixed on CUDA, worker elsewhere

All placements give the same maps (a speed choice only).  The dataset builds in its workers
what the placement gives them (:class:`~staralign.data.dataset.LandmarkDataset`); the step
builds on the device whatever a batch lacks (:func:`~staralign.data.targets.batch_targets`).
A run whose step needs no maps (:func:`~.step.needs_target_maps`) builds none anywhere.

The training sampler (:class:`EpochSampler`) shards a shuffled epoch across processes and
resumes mid-epoch; the validation set is split by rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import TrainConfig
from ..definitions import LandmarkDefinition
from .distributed import DistEnv
from .step import needs_target_maps

__all__ = ["EpochSampler", "Loaders", "build_loaders", "resolve_targets", "timed_batches"]

log = logging.getLogger("staralign.train")


def resolve_targets(targets: str, device: torch.device) -> str:
    """``data.targets`` made concrete: "auto" is "mixed" on CUDA (there it measured 1.1-1.2x
    "worker" end to end and level with "device", whose edge rasteriser costs the GPU ~24 ms a
    batch; docs/benchmarks.md) and "worker" elsewhere (the workers run beside a CPU step)."""
    if targets == "auto":
        return "mixed" if device.type == "cuda" else "worker"
    return targets


class Loaders(NamedTuple):
    """A run's datasets and loaders; the training sampler is the one that resumes mid-epoch."""

    train_set: Dataset
    val_set: Dataset
    train: DataLoader
    val: DataLoader
    sampler: EpochSampler

    def close(self) -> None:
        """Stop both loaders' persistent workers now.  A run that fails keeps its frames, and so
        its loaders, alive in the traceback; without this their workers linger until the garbage
        collector reaches them, which then blocks about 5 s per loader in whatever runs next."""
        for loader in (self.train, self.val):
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            if hasattr(loader, "_iterator"):
                loader._iterator = None

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Order and augmentation of ``epoch``, from batch ``skip_batches`` on (a resume mid-epoch)."""
        self.sampler.set_epoch(epoch, skip_batches=skip_batches)
        self.train_set.set_epoch(epoch)


def build_loaders(config: TrainConfig, definition: LandmarkDefinition, env: DistEnv) -> Loaders:
    """Training and validation datasets and loaders (sharded across processes)."""
    from ..data.dataset import LandmarkDataset, collate_samples, find_annotation_file, worker_init_fn

    dc, mc = config.data, config.model
    train_file = find_annotation_file(dc.annot_dir, definition.name, dc.train_file)
    val_file = find_annotation_file(dc.annot_dir, definition.name, dc.val_file)
    # A step that needs no maps gets none from the workers (and builds none on the device).
    placement = resolve_targets(dc.targets, env.device) if needs_target_maps(config) else "device"
    train_ds = LandmarkDataset(
        train_file, dc.image_dir, definition, train=True, input_size=mc.input_size,
        heatmap_size=mc.heatmap_size, seed=config.runtime.seed, targets=placement,
        skip_bad_rows=dc.skip_bad_rows, aug_prob=dc.aug_prob,
        image_dtype="uint8" if dc.uint8_images else "float32",
    )
    val_ds = LandmarkDataset(
        val_file, dc.image_dir, definition, train=False, input_size=mc.input_size,
        heatmap_size=mc.heatmap_size, seed=config.runtime.seed, targets="device",
        skip_bad_rows=dc.skip_bad_rows,
    )
    for ds, f in ((train_ds, train_file), (val_ds, val_file)):
        skipped = getattr(ds, "skipped", [])
        if skipped:
            log.warning("%s: skipped %d bad rows (first: %s)", f, len(skipped), skipped[0])
    global_batch = config.optim.batch_size * env.world_size
    if len(train_ds) < global_batch:
        raise ValueError(f"{train_file}: {len(train_ds)} training samples, fewer than one global batch "
                         f"({global_batch}); lower --batch-size")
    sampler = EpochSampler(len(train_ds), seed=config.runtime.seed, shuffle=True, rank=env.rank,
                           world_size=env.world_size, batch_size=config.optim.batch_size, drop_last=True)
    pin = env.device.type == "cuda"
    workers = dc.workers
    train_loader = DataLoader(
        train_ds, batch_size=config.optim.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_samples, pin_memory=pin, drop_last=True, worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    val_indices = list(range(env.rank, len(val_ds), env.world_size))
    val_loader = DataLoader(
        torch.utils.data.Subset(val_ds, val_indices), batch_size=dc.val_batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate_samples, pin_memory=pin, worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0,
    )
    return Loaders(train_ds, val_ds, train_loader, val_loader, sampler)


def timed_batches(loader: Iterable[Any], waited: list[float]) -> Iterator[Any]:
    """Iterate ``loader``, adding the time spent waiting for each batch to ``waited[0]``.

    The step ends with a host sync, so this is time the device had no work from us: a
    loader that keeps up shows near zero (reported per epoch as ``data_wait_seconds``)."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield batch


class EpochSampler(Sampler[int]):
    """Deterministic shuffling shared by all ranks, split across ranks, resumable mid-epoch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``; rank ``r`` of
    ``W`` takes positions ``r, r + W, ...``, so global step ``k`` covers the same
    samples whatever ``W`` is (as long as the per-rank batch times ``W`` is the
    global batch).  ``skip`` drops the first samples of this rank's share (to
    resume inside an epoch).  With ``drop_last`` the tail that does not fill a
    global batch is dropped.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches * self.batch_size

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            order = order[: len(order) // global_batch * global_batch]
        else:
            pad = (-len(order)) % self.world_size
            order = order + order[:pad]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return max(len(self._indices()) - self.skip, 0)

    def batches_per_epoch(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
