"""Inference for users: faces and landmarks in photos and video, ONNX export, gradients.

* :class:`LandmarkDetector` (``detector``): the Python API; PyTorch or onnxruntime.
* ``faces``: face detectors (OpenCV Haar by default, no download) and box framing.
* ``export``: ONNX export checked against PyTorch; ``onnx_backend`` runs it without torch.
* ``differentiable``: landmarks as a differentiable function of an image tensor.
* ``cli``: ``staralign predict`` and ``staralign export``.

Names are imported lazily, so ``import staralign.inference`` pulls in neither
torch nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Ambiguity": ".detector",
    "Face": ".detector",
    "LandmarkDetector": ".detector",
    "BoxFraming": ".faces",
    "FaceDetector": ".faces",
    "FaceDetectorError": ".faces",
    "calibrate_framing": ".faces",
    "get_face_detector": ".faces",
    "export_onnx": ".export",
    "DifferentiableLandmarks": ".differentiable",
    "differentiable_crop": ".differentiable",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
