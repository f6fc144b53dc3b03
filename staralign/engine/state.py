"""Training state on disk: written atomically, read without unpickling code.

A run directory keeps the weights in our model format (``last.safetensors``,
``best.safetensors``: a file alone rebuilds the model) and everything else needed
to continue in ``train_state.pt``: model, EMA, optimiser and scheduler state,
epoch and step, best metric, RNG states, counters.  Every file is written to a
temporary name, flushed to disk and renamed, so a crash (even SIGKILL) during a
save leaves the previous file intact and loadable.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_path
from ..models.checkpoint import CheckpointError

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from ..config import OptimConfig
    from .step import TrainStep

STATE_FILE = "train_state.pt"
STATE_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (a crash mid-write leaves the previous file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # Generators take their state as CPU byte tensors; a state loaded with
    # ``map_location="cuda"`` (as a GPU run resumes) arrives on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / STATE_FILE
    atomic_torch_save({"version": STATE_VERSION, **state}, path)
    return path


class StateError(CheckpointError):
    """``train_state.pt`` cannot be used; the message is one line naming the file."""


def load_state(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
               complete: bool = False) -> dict[str, Any]:
    """The saved training state of a run, read through the same safe path as checkpoints
    (``weights_only``: no code is unpickled; a foreign file is "not a training state").
    ``complete``: also require every entry a resume restores (with its type)."""
    from ..models.checkpoint import safe_torch_load

    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        raise StateError(f"{path}: no training state to resume from (is {run_dir} a run directory?)")
    state = safe_torch_load(path, "staralign training state", map_location=map_location, error=StateError)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise StateError(f"{path}: not a staralign training state (version {version!r})")
    for key, kind in _STATE_FIELDS.items() if complete else ():
        if not isinstance(state.get(key), kind):
            raise StateError(f"{path}: not a complete training state (entry {key!r} is missing or "
                             f"{type(state.get(key)).__name__}, not {kind.__name__})")
    return state


# What ``train`` reads back from a state (checked before anything is restored).
_STATE_FIELDS = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int, "step": int,
                 "best": dict, "counters": dict, "rng": dict}


# --------------------------------------------------------------------------- checkpoints


@dataclass
class RunProgress:
    """What a run has done besides its weights: saved in every checkpoint, restored by a resume."""

    best: dict[str, Any] = field(default_factory=lambda: {"nme": math.inf, "epoch": -1, "source": ""})
    skipped: int = 0  # batches skipped for a non-finite loss, over the whole run
    history: list[dict[str, Any]] = field(default_factory=list)  # one validation record per epoch

    def update_best(self, nmes: dict[str, float], epoch: int) -> bool:
        """Take the best of this epoch's NMEs (model, EMA); returns whether one beat the best."""
        improved = False
        for source, nme in nmes.items():
            if nme < self.best["nme"]:
                self.best = {"nme": nme, "epoch": epoch, "source": source}
                improved = True
        return improved


def save_checkpoint(run_dir: str | os.PathLike, step: TrainStep, scheduler: LRScheduler, progress: RunProgress,
                    epoch: int, batch: int) -> Path:
    """Everything a resume needs to continue at batch ``batch`` of epoch ``epoch`` (0-based)."""
    return save_state(run_dir, {
        "model": step.model.state_dict(),
        "ema": step.ema.state_dict() if step.ema is not None else {},
        "optimizer": step.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "epoch": epoch, "step": batch, "best": progress.best,
        "counters": {"skipped_batches": progress.skipped},
        "history": progress.history,
        "rng": rng_state(),
    })


def restore_checkpoint(run_dir: str | os.PathLike, step: TrainStep, scheduler: LRScheduler, optim: OptimConfig,
                       device: torch.device) -> tuple[int, int, RunProgress]:
    """Load a run's saved state into ``step`` and ``scheduler`` and the RNGs; returns (epoch, batch,
    progress) to continue from.  Call it before the step's first call (a CUDA graph captures the
    state it finds).  The schedule takes ``optim``'s milestones and gamma (a resume may change them)."""
    state = load_state(run_dir, map_location=device, complete=True)
    step.model.load_state_dict(state["model"])
    if step.ema is not None and "ema" in state:
        step.ema.load_state_dict(state["ema"])
    step.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.milestones, scheduler.gamma = Counter(optim.milestones), optim.gamma
    step.scaler.load_state_dict(state["scaler"])
    # A budget stop's partial-epoch record: the resumed epoch records itself when it ends
    # (as metrics.jsonl is cut back to the resumed step).
    history = [h for h in state.get("history", []) if not h.get("partial_steps")]
    set_rng_state(state["rng"])
    progress = RunProgress(state["best"], int(state["counters"].get("skipped_batches", 0)), history)
    return state["epoch"], state["step"], progress
