"""Training state on disk: written atomically, read without unpickling code.

A run directory keeps the weights in our model format (``last.safetensors``,
``best.safetensors``: a file alone rebuilds the model) and everything else needed
to continue in ``train_state.pt``: model, EMA, optimiser and scheduler state,
epoch and step, best metric, RNG states, counters.  Every file is written to a
temporary name, flushed to disk and renamed, so a crash (even SIGKILL) during a
save leaves the previous file intact and loadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path
from ..models.checkpoint import CheckpointError

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
