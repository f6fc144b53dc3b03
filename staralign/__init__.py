"""staralign: STAR loss facial landmark detection (Zhou et al., CVPR 2023) in PyTorch.

The pipeline reads top to bottom: ``definitions`` -> ``data`` (annotations,
transforms, targets) -> ``models`` -> ``losses`` -> ``engine`` (training,
evaluation) -> ``metrics`` -> ``inference``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LandmarkDetector", "__version__", "get_definition", "load_model"]


def __getattr__(name: str):
    # Lazy: importing staralign must not pull in torch-heavy modules until used.
    if name == "LandmarkDetector":
        from .inference.detector import LandmarkDetector

        return LandmarkDetector
    if name == "load_model":
        from .models.checkpoint import load_model

        return load_model
    if name == "get_definition":
        from .definitions import get_definition

        return get_definition
    raise AttributeError(f"module 'staralign' has no attribute {name!r}")
