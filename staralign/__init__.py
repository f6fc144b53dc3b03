"""staralign: STAR loss facial landmark detection (Zhou et al., CVPR 2023) in PyTorch.

The pipeline reads top to bottom: ``definitions`` -> ``data`` (annotations,
transforms, targets) -> ``models`` -> ``losses`` -> ``engine`` (training,
evaluation) -> ``metrics`` -> ``inference``.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["LandmarkDetector", "__version__", "get_definition", "load_model"]

# Lazy: importing staralign must not pull in torch-heavy modules until a name is used.
_EXPORTS = {
    "LandmarkDetector": ".inference.detector",
    "load_model": ".models.checkpoint",
    "get_definition": ".definitions",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
