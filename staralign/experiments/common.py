"""Set-up shared by the demo and the ambiguity experiment (light: heavy imports inside)."""

from __future__ import annotations

import os
from typing import Any

IMAGE_SIZE = 128  # synthetic image side; the tiny preset crops to 128 px as well


def draw_faces(data_dir: str | os.PathLike, train: int, test: int, ambiguity: float, seed: int,
               workers: int, quiet: bool) -> dict[str, Any]:
    """The experiments' synthetic dataset (``IMAGE_SIZE`` px) in ``data_dir``; ``workers`` are the
    training loader's processes (drawing uses one more)."""
    from ..data.synth import generate_dataset

    return generate_dataset(data_dir, train=train, test=test, ambiguity=ambiguity, seed=seed, size=IMAGE_SIZE,
                            workers=max(1, workers + 1), progress=not quiet)


def tiny_config(data_dir: str | os.PathLike, workers: int, device: str, seed: int,
                *overrides: dict[str, Any] | None):
    """The ``tiny`` preset training on the synthetic dataset in ``data_dir``, with ``overrides``
    (nested TrainConfig fields; ``None`` skipped) merged in order."""
    from ..config import load_preset, merge

    config = merge(load_preset("tiny"), {
        "data": {"image_dir": str(data_dir), "annot_dir": str(data_dir), "workers": workers},
        "runtime": {"device": device, "seed": seed},
    })
    for extra in overrides:
        if extra:
            config = merge(config, extra)
    return config
