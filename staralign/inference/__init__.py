"""Inference for users: faces and landmarks in photos and video, ONNX export, gradients.

* :class:`LandmarkDetector` (``detector``): the Python API; PyTorch or onnxruntime.
* ``faces``: face detectors (OpenCV's YuNet by default, Haar as the no-download fallback) and
  how their output frames the crop (box or five keypoints).
* ``export``: ONNX export checked against PyTorch; ``onnx_backend`` runs it without torch.
* ``differentiable``: landmarks as a differentiable function of an image tensor.
* ``cli``: ``staralign predict`` and ``staralign export``.

Names are imported lazily, so ``import staralign.inference`` pulls in neither
torch nor onnxruntime.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Ambiguity": ".detector",
    "Face": ".detector",
    "LandmarkDetector": ".detector",
    "ModelOutputError": ".detector",
    "BoxFraming": ".faces",
    "FaceDetector": ".faces",
    "FaceDetectorError": ".faces",
    "KeypointFraming": ".faces",
    "YuNetDetector": ".faces",
    "calibrate_framing": ".faces",
    "get_face_detector": ".faces",
    "parse_box": ".faces",
    "export_onnx": ".export",
    "DifferentiableLandmarks": ".differentiable",
    "differentiable_crop": ".differentiable",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
