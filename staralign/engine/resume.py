"""What may change when a run is resumed, and the saved configuration's paths.

A resumed run keeps its saved ``config.yaml``; settings that change neither the model nor
the data definition nor the loss (:data:`RESUMABLE`: epochs and schedule, loader workers,
device, the image and annotation folders, save cadence, time budget) may be given anew --
``staralign train --resume RUN --epochs 12`` extends a finished run -- and every change is
logged.  Anything else would make the resumed run a different experiment and is refused
by the CLI (the library keeps the saved value and warns).

Paths in a saved configuration are absolute (:func:`absolute_paths`), so a run trained with
``--annot-dir data`` resumes from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import TrainConfig, from_dict, to_dict

__all__ = ["RESUMABLE", "absolute_paths", "resume_config"]

# (section, field) of TrainConfig that a resume may change.
RESUMABLE = (
    ("optim", "epochs"), ("optim", "milestones"), ("optim", "gamma"),
    ("data", "workers"), ("data", "image_dir"), ("data", "annot_dir"), ("data", "val_batch_size"),
    ("runtime", "device"), ("runtime", "save_every_steps"), ("runtime", "time_budget_minutes"),
    ("runtime", "log_every"),
)


def _looks_like_path(value: str) -> bool:
    return bool(value) and (os.sep in value or value.endswith((".yaml", ".yml")) or Path(value).exists())


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its folders (and a definition given as a file) made absolute."""
    d = to_dict(config)
    for key in ("image_dir", "annot_dir"):
        if d["data"][key]:
            d["data"][key] = str(Path(d["data"][key]).expanduser().absolute())
    definition = d["model"]["definition"]
    if isinstance(definition, str) and _looks_like_path(definition) and Path(definition).is_file():
        d["model"]["definition"] = str(Path(definition).absolute())
    return from_dict(TrainConfig, d)


def resume_config(saved: TrainConfig, given: TrainConfig) -> tuple[TrainConfig, list[str], list[str]]:
    """(the configuration to resume with, the changes applied as readable lines, the fields that
    differ but may not change).  Folders are compared as absolute paths."""
    s, g = to_dict(absolute_paths(saved)), to_dict(absolute_paths(given))
    out = to_dict(absolute_paths(saved))
    changes, refused = [], []
    for section, fields in g.items():
        for key, value in fields.items():
            old = s[section][key]
            if value == old:
                continue
            if (section, key) in RESUMABLE:
                out[section][key] = value
                changes.append(f"{section}.{key}: {old!r} -> {value!r}")
            else:
                refused.append(f"{section}.{key}")
    return from_dict(TrainConfig, out), changes, refused
