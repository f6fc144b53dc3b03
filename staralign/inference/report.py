"""The header of the JSON report that ``staralign predict --json`` writes and ``staralign serve`` answers.

Built here once, so the two cannot drift apart; each adds ``inputs`` and ``errors``
(and the web a ``timing`` block).  Imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .detector import LandmarkDetector

__all__ = ["COORDINATES", "face_detector_name", "report_header"]

COORDINATES = "pixels of the original image, (x, y), pixel centres at integers"


def face_detector_name(detector: LandmarkDetector) -> str:
    """The name of the detector's face detector (``"opencv"``, ``"none"``, ...; a callable's class name).

    Creates the face detector if it was not yet (FaceDetectorError if it is unavailable).
    """
    face_detector = detector.face_detector
    return str(getattr(face_detector, "name", type(face_detector).__name__))


def report_header(detector: LandmarkDetector, weights: str, *, box: bool = False,
                  format: str | None = None, face_detector: Any = None) -> dict[str, Any]:
    """Everything in the report before ``inputs`` and ``errors``, in order.

    ``weights``: as shown to the reader (a path or a file name).  ``box``: faces came
    from given boxes, not the face detector (which is then never created).
    ``format``: the output layout (None: the detector's own ``format``).
    ``face_detector``: the face detector object used instead of the detector's own.
    """
    from .. import __version__

    layout = detector.layout(format)
    return {
        "staralign": __version__,
        "weights": str(weights),
        "backend": detector.backend.name,
        "detector": "box" if box else (face_detector_name(detector) if face_detector is None
                                       else str(getattr(face_detector, "name", type(face_detector).__name__))),
        "layout": layout.name,
        "num_points": layout.num_points,
        "coordinates": COORDINATES,
    }
