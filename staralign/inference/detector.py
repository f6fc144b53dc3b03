"""Landmarks on photos in three lines: :class:`LandmarkDetector`.

::

    from staralign import LandmarkDetector
    det = LandmarkDetector.from_checkpoint("WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl")
    faces = det.detect("photo.jpg")          # [Face(box, landmarks, score, ambiguity)]

Steps per image: find faces (:mod:`~staralign.inference.faces`), place each crop
like the training crops (from YuNet's five keypoints: centre, scale and roll, so a
tilted face reaches the network upright; from other detectors' boxes: centre and
scale), warp it to the network's input, run the network (PyTorch, or onnxruntime
for ``.onnx`` files), and map the landmarks and their heatmap covariances back to
the original image's pixels.  With ``refine=True`` a second pass re-crops each face
from the first pass's landmarks by the training convention
(:func:`staralign.crop.upright_landmark_crop`).  A network whose output is not
finite (broken weights) raises :class:`ModelOutputError` naming the weights.  This module imports
neither torch nor onnxruntime itself: the backend does, so the ONNX path runs
without torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._io import finite_json
from ..cli import UserError
from ..crop import upright_landmark_crop
from ..definitions import LandmarkDefinition, get_definition
from . import geometry
from .faces import FaceDetector, FixedBoxes, framing_of, get_face_detector, keypoint_frame, unpack_detection
from .inputs import as_bgr

__all__ = ["FORMAT_ALIASES", "Ambiguity", "Backend", "Face", "LandmarkDetector", "ModelOutputError"]

# Output layouts by a friendlier name: ``format="68"`` is 300W's 68 points.
FORMAT_ALIASES = {"68": "300W", "98": "WFLW", "29": "COFW"}


class ModelOutputError(UserError):
    """The network gave NaN or infinite landmarks: its weights are broken (e.g. a diverged run)."""


class Backend(Protocol):
    """What runs the network: normalised crops in, normalised landmarks and covariances out."""

    name: str
    definition: LandmarkDefinition
    input_size: int
    has_ambiguity: bool
    conversions: dict[str, np.ndarray]

    def run(self, batch: np.ndarray, ambiguity: bool = True) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class Ambiguity:
    """How uncertain each landmark is, from the spread of its predicted heatmap, in image pixels.

    STAR's premise is that a landmark on a contour (jaw, brow, lip) is ambiguous
    along the contour: its heatmap stretches along the tangent.  ``major`` and
    ``minor`` are the standard deviations (pixels of the original image) along the
    heatmap's principal axes, ``tangent`` the unit (x, y) direction of the major
    axis (sign normalised to x >= 0), ``covariance`` the full 2x2 matrix in pixels
    squared.  The heatmap's spread includes the width of the training targets,
    so read it as relative (which points, which direction), not as a calibrated
    error bar.
    """

    major: np.ndarray  # (N,) px
    minor: np.ndarray  # (N,) px
    tangent: np.ndarray  # (N, 2) unit vectors
    covariance: np.ndarray  # (N, 2, 2) px^2

    @classmethod
    def from_covariance(cls, covariance: np.ndarray) -> Ambiguity:
        cov = np.asarray(covariance, np.float64)
        evals, evecs = geometry.eigh2x2(cov)
        tangent = evecs[..., :, 1]
        flip = (tangent[..., 0] < 0) | ((tangent[..., 0] == 0) & (tangent[..., 1] < 0))
        tangent = np.where(flip[..., None], -tangent, tangent)
        evals = np.clip(evals, 0.0, None)
        return cls(np.sqrt(evals[..., 1]), np.sqrt(evals[..., 0]), tangent, cov)

    def to_dict(self) -> dict[str, Any]:
        return {
            "major_std": _round(self.major),
            "minor_std": _round(self.minor),
            "tangent": _round(self.tangent, 5),
        }


def _round(a: np.ndarray, digits: int = 3) -> list:
    return np.round(np.asarray(a, np.float64), digits).tolist()


@dataclass
class Face:
    """One face: the detector's ``box`` (x1, y1, x2, y2), ``landmarks`` (N, 2) in original image
    pixels (pixel centres at integers), the detector's ``score`` (None for given boxes), the
    per-landmark ``ambiguity`` (None when not computed), the landmark ``layout`` name, the
    crop the network saw (``scale``, ``center``: the dataset's convention; ``angle``: the
    face's roll in degrees, which the crop undid; ``refined``: placed from a first pass's
    landmarks), and the detector's five ``keypoints`` (5, 2) when it gives them (right eye,
    left eye, nose tip, right and left mouth corner), else None."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float | None = None
    ambiguity: Ambiguity | None = None
    layout: str = ""
    scale: float = 0.0
    center: tuple[float, float] = field(default=(0.0, 0.0))
    angle: float = 0.0
    keypoints: np.ndarray | None = None
    refined: bool = False

    def to_dict(self, ambiguity: bool = True) -> dict[str, Any]:
        """Plain JSON types: lists of floats, None as null (also for NaN or infinite values,
        which a broken checkpoint can produce and strict JSON cannot hold)."""
        out: dict[str, Any] = {
            "box": [round(float(v), 2) for v in self.box],
            "score": None if self.score is None else round(float(self.score), 4),
            "layout": self.layout,
            "landmarks": _round(self.landmarks),
            "crop": {"scale": round(float(self.scale), 5), "center": [round(float(c), 3) for c in self.center],
                     "angle": round(float(self.angle), 3), "refined": bool(self.refined)},
            "keypoints": None if self.keypoints is None else _round(self.keypoints, 2),
        }
        if ambiguity and self.ambiguity is not None:
            out["ambiguity"] = self.ambiguity.to_dict()
        return finite_json(out)


def _canonical_format(fmt: str | None, native: str) -> str:
    if fmt is None or fmt == "native" or str(fmt).upper() == native.upper():
        return native
    return FORMAT_ALIASES.get(str(fmt), str(fmt)).upper()


def _boxes_of(box: Any) -> list[tuple[float, float, float, float]] | None:
    """None, one box (4 numbers) or several -> a list of boxes (validated)."""
    if box is None:
        return None
    return FixedBoxes(box).boxes


def _convert_points(m: np.ndarray, points: np.ndarray,
                    covariance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Another layout's points ``m @ points`` (M, 2) and covariances ``sum_j m_ij^2 C_j`` (M, 2, 2)
    (the model's errors taken as independent); ``covariance`` None stays None."""
    cov = None if covariance is None else np.einsum("ij,jkl->ikl", m * m, covariance)
    return m @ points, cov


class LandmarkDetector:
    """Faces and landmarks in photos and video frames, with no download beyond the weights.

    Build it with :meth:`from_checkpoint` (official ``.pkl``, staralign
    ``.safetensors`` or exported ``.onnx``), :meth:`from_onnx` or :meth:`from_model`.
    ``detector`` is a face detector name (``"yunet"``, ``"opencv"``, ``"none"``,
    ``"dlib"``, ``"mediapipe"``) or any callable ``image -> [(box, score[, keypoints])]``;
    it is created when first needed, so an image with a given ``box`` never needs it.
    ``weights`` names the model in error messages (set by the ``from_*`` constructors).  ``format`` is
    the default output layout: ``"native"`` or ``"68"`` (300W's points from a WFLW model).
    """

    def __init__(self, backend: Backend, detector: str | FaceDetector | None = "yunet",
                 format: str = "native", batch_size: int = 8, ambiguity: bool = True,
                 weights: str | None = None) -> None:
        self.backend = backend
        self.weights = weights or f"the {getattr(backend, 'name', 'in-memory')} model"
        self._detector_spec = detector
        self._detector: FaceDetector | None = None
        self._named_detectors: dict[str, FaceDetector] = {}
        self.format = _canonical_format(format, backend.definition.name)
        self.batch_size = max(1, int(batch_size))
        self.ambiguity = bool(ambiguity)
        if self.format != backend.definition.name:
            self._conversion(self.format)  # fail now on an unknown layout

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto",
                        detector: str | FaceDetector | None = "yunet", allow_pickle: bool = False,
                        ema: bool = False, format: str = "native", definition: Any = None,
                        batch_size: int = 8, stacks: int | None = None, threads: int | None = None,
                        amp: str | None = None) -> LandmarkDetector:
        """From a weights file; ``.onnx`` files go to :meth:`from_onnx` (no torch needed).

        ``stacks=K``: early exit, the K-th stack's landmarks (later stacks not run);
        ``threads``: CPU intra-op threads (default: the cores available to this process);
        ``amp``: ``"bf16"`` (CPU or GPU, with channels-last) or ``"fp16"`` (GPU), PyTorch only.
        """
        if Path(path).suffix.lower() == ".onnx":
            if amp not in (None, "", "none"):
                raise ValueError(f"{path}: amp applies to PyTorch weights; an .onnx file runs as exported")
            return cls.from_onnx(path, detector=detector, format=format, batch_size=batch_size, stacks=stacks,
                                 threads=threads)
        from .torch_backend import TorchBackend

        backend = TorchBackend.from_checkpoint(path, device=device, allow_pickle=allow_pickle, ema=ema,
                                               definition=definition, stacks=stacks, threads=threads, amp=amp,
                                               channels_last=amp not in (None, "", "none"))
        return cls(backend, detector=detector, format=format, batch_size=batch_size, weights=str(path))

    @classmethod
    def from_pretrained(cls, name: str | None = None, **kwargs: Any) -> LandmarkDetector:
        """From a published model's name (``"wflw"``, ``"300w"``, ``"cofw"``; None: the hub's default,
        ``"wflw"``) or a weights path.

        The authors' file is downloaded into the cache on first use and verified
        (see :mod:`staralign.hub` and ``staralign models``); later calls read the cached
        file with no network access.  ``kwargs`` go to :meth:`from_checkpoint`.
        """
        from ..hub import resolve_weights

        return cls.from_checkpoint(resolve_weights(name), **kwargs)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, detector: str | FaceDetector | None = "yunet",
                  format: str = "native", providers: list[str] | None = None,
                  batch_size: int = 8, stacks: int | None = None, threads: int | None = None) -> LandmarkDetector:
        """From a file written by ``staralign export``, run by onnxruntime; never imports torch.

        The stacks an ``.onnx`` file runs are fixed at export (``staralign export --stacks K``):
        ``stacks`` other than the file's raises ValueError.
        """
        from .onnx_backend import OnnxBackend

        backend = OnnxBackend(path, providers=providers, threads=threads)
        if stacks is not None and backend.stacks is not None and int(stacks) != int(backend.stacks):
            raise ValueError(f"{path}: exported with {backend.stacks} stack(s), not {stacks}; "
                             f"export again with 'staralign export --stacks {stacks}'")
        return cls(backend, detector=detector, format=format, batch_size=batch_size, weights=str(path))

    @classmethod
    def from_model(cls, model: Any, device: str = "auto", detector: str | FaceDetector | None = "yunet",
                   format: str = "native", batch_size: int = 8, stacks: int | None = None,
                   threads: int | None = None) -> LandmarkDetector:
        """From a network already in memory (e.g. right after training)."""
        from .torch_backend import TorchBackend

        return cls(TorchBackend(model, device, stacks=stacks, threads=threads), detector=detector, format=format,
                   batch_size=batch_size, weights="the model passed to from_model")

    # ------------------------------------------------------------------ properties

    @property
    def definition(self) -> LandmarkDefinition:
        """The network's landmark layout (before any ``format`` conversion)."""
        return self.backend.definition

    @property
    def input_size(self) -> int:
        return self.backend.input_size

    @property
    def face_detector(self) -> FaceDetector:
        """The face detector, created on first use (raises FaceDetectorError if unavailable)."""
        if self._detector is None:
            self._detector = get_face_detector(self._detector_spec)
        return self._detector

    def face_detector_for(self, detector: str | FaceDetector | None = None) -> FaceDetector:
        """This detector's own face detector (``detector`` None), or another one by name or object;
        named ones are created once and kept (e.g. the web page's per-image choice)."""
        if detector is None or detector == self._detector_spec:
            return self.face_detector
        if isinstance(detector, str):
            if detector not in self._named_detectors:
                self._named_detectors[detector] = get_face_detector(detector)
            return self._named_detectors[detector]
        return get_face_detector(detector)

    # ------------------------------------------------------------------ detection

    def find_faces(self, image: np.ndarray, box: Any = None,
                   detector: str | FaceDetector | None = None) -> list[tuple]:
        """``(box, score[, keypoints])`` of the faces in a BGR image: the given boxes, or the
        face detector's (``detector``: another one than this detector's own)."""
        boxes = _boxes_of(box)
        if boxes is not None:
            return [(b, None) for b in boxes]
        return list(self.face_detector_for(detector)(image))

    def detect(self, image: Any, color: str = "bgr", box: Any = None, format: str | None = None,
               ambiguity: bool | None = None, refine: bool = False,
               detector: str | FaceDetector | None = None) -> list[Face]:
        """Faces in one image: a path, an array (``color`` ``"bgr"`` or ``"rgb"``) or a PIL image.

        ``box``: one box (x1, y1, x2, y2) or a list of them, used instead of the face
        detector (dataset-style boxes).  ``refine``: a second pass, re-cropped from the
        first pass's landmarks (about twice the network time).  ``detector``: a face
        detector for this call instead of this object's own.  No face found gives ``[]``.
        """
        return self.detect_batch([image], color=color, boxes=[box], format=format, ambiguity=ambiguity,
                                 refine=refine, detector=detector)[0]

    def detect_batch(self, images: Sequence[Any], color: str = "bgr", boxes: Sequence[Any] | None = None,
                     format: str | None = None, ambiguity: bool | None = None, refine: bool = False,
                     detector: str | FaceDetector | None = None) -> list[list[Face]]:
        """Faces in many images, with the network run on batches of ``batch_size`` crops.

        ``boxes``: None, or one entry per image (None, a box, or a list of boxes).
        Raises :class:`ModelOutputError` when the network's output is not finite.
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"boxes: one entry per image expected, got {len(boxes)} for {len(images)} images")
        want_amb = self.ambiguity if ambiguity is None else bool(ambiguity)
        bgr = [as_bgr(im, color) for im in images]
        jobs: list[dict[str, Any]] = []
        for i, image in enumerate(bgr):
            given = boxes[i] if boxes is not None else None
            framing = framing_of(self.face_detector_for(detector)) if given is None else None
            for detection in self.find_faces(image, given, detector):
                found, score, kps = unpack_detection(detection)
                if framing is None:  # a given, dataset-style box
                    scale, center = geometry.box_to_crop(found)
                    angle = 0.0
                else:
                    scale, center, angle = framing.place(found, kps)
                jobs.append({"image": i, "box": found, "score": score, "keypoints": kps,
                             "scale": scale, "center": center, "angle": angle, "refined": False})
        outputs = self._run_network(bgr, jobs, want_amb and not refine)
        if refine:
            for job, (points, _) in zip(jobs, outputs, strict=True):
                job["angle"] = self._refined_angle(points, job["angle"])
                job["scale"], job["center"] = upright_landmark_crop(points, job["angle"])
                job["refined"] = True
            outputs = self._run_network(bgr, jobs, want_amb)
        target = self.format if format is None else _canonical_format(format, self.definition.name)
        m = self._conversion(target) if target != self.definition.name else None
        results: list[list[Face]] = [[] for _ in images]
        for job, (points, cov_px) in zip(jobs, outputs, strict=True):
            if m is not None:  # another layout: convert first, so the ambiguity is built once
                points, cov_px = _convert_points(m, points, cov_px)
            amb = None if cov_px is None else Ambiguity.from_covariance(cov_px)
            results[job["image"]].append(Face(
                job["box"], points, job["score"], amb, self.definition.name if m is None else target,
                float(job["scale"]), (float(job["center"][0]), float(job["center"][1])),
                float(job["angle"]), job["keypoints"], job["refined"]))
        return results

    def _run_network(self, bgr: list[np.ndarray], jobs: list[dict[str, Any]],
                     ambiguity: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Each job's crop through the network, in batches: (landmarks, covariance or None) in
        image pixels, the model's own layout."""
        size = self.input_size
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            matrices = [geometry.crop_matrix(j["scale"], j["center"], size, j["angle"]) for j in chunk]
            batch = geometry.crops_to_input([geometry.crop_image(bgr[j["image"]], mat, size)
                                             for j, mat in zip(chunk, matrices, strict=True)])
            landmarks, cov = self.backend.run(batch, ambiguity)
            if not np.isfinite(landmarks).all() or (cov is not None and not np.isfinite(cov).all()):
                raise ModelOutputError(
                    f"{self.weights}: the model's output is not finite (NaN or infinite landmarks); "
                    "its weights are broken (a diverged training run?): use another weights file")
            for k, mat in enumerate(matrices):
                points = geometry.points_to_image(landmarks[k], mat, size)
                cov_px = None if cov is None else geometry.covariance_to_image(cov[k], mat, size)
                out.append((points, cov_px))
        return out

    def _refined_angle(self, points: np.ndarray, angle: float) -> float:
        """The face's roll from the first pass's eyes (the definition's ``five_points``); the
        first pass's angle when the layout has none.  The eye order of a layout does not
        matter: the eye line is taken within 90 degrees of the first pass's."""
        groups = self.definition.five_points
        if not groups:
            return angle
        five = np.stack([np.asarray(points)[np.atleast_1d(g)].mean(0) for g in groups])
        roll = keypoint_frame(five)["angle"]
        delta = (roll - angle + 90.0) % 180.0 - 90.0
        return float(angle + delta)

    # ------------------------------------------------------------------ layouts

    def layout(self, format: str | None = None) -> LandmarkDefinition:
        """The landmark definition of the faces :meth:`detect` returns for ``format`` (None: this
        detector's own ``format``; ``"native"``: the model's).

        Raises ValueError if the model cannot give that layout or it has no known definition.
        """
        target = self.format if format is None else _canonical_format(format, self.definition.name)
        if target == self.definition.name:
            return self.definition
        self._conversion(target)  # ValueError if this model cannot give it
        return get_definition(target)  # DefinitionError (a ValueError) for a layout without a definition

    def formats(self) -> dict[str, LandmarkDefinition]:
        """Every value of ``format`` this model accepts, with the layout each gives.

        ``"native"``, the model's own layout, each layout it converts to (stored in the
        model file, or registered in ``staralign.data.landmark_formats``) and the
        :data:`FORMAT_ALIASES` of these; in that order, aliases before names.
        """
        from ..data.landmark_formats import CONVERSIONS

        targets = list(self.backend.conversions)
        targets += [dst for src, dst in CONVERSIONS if src == self.definition.name.upper()]
        out: dict[str, LandmarkDefinition] = {}
        for fmt in dict.fromkeys(["native", *FORMAT_ALIASES, self.definition.name, *targets]):
            try:
                out[fmt] = self.layout(fmt)
            except ValueError:  # no conversion, or no definition to describe the result
                continue
        return out

    def _conversion(self, target: str) -> np.ndarray:
        src = self.definition.name.upper()
        if target in self.backend.conversions:
            return self.backend.conversions[target]
        from ..data.landmark_formats import conversion_matrix

        try:
            return conversion_matrix(src, target)
        except KeyError as exc:
            raise ValueError(str(exc.args[0]) if exc.args else str(exc)) from None

    def convert(self, faces: Sequence[Face], format: str) -> list[Face]:
        """The same faces in another layout, e.g. ``"68"`` (300W) from a 98-point WFLW model.

        Points are weighted sums of the model's points (``staralign.data.landmark_formats``);
        covariances follow as ``sum w^2 C`` (errors taken as independent).
        """
        target = _canonical_format(format, self.definition.name)
        out = []
        for face in faces:
            if face.layout.upper() == target:
                out.append(face)
                continue
            if face.layout.upper() != self.definition.name.upper():
                raise ValueError(f"cannot convert a {face.layout} face with a {self.definition.name} model")
            m = self._conversion(target)
            points, cov = _convert_points(m, face.landmarks,
                                          None if face.ambiguity is None else face.ambiguity.covariance)
            amb = None if cov is None else Ambiguity.from_covariance(cov)
            out.append(Face(face.box, points, face.score, amb, target, face.scale, face.center, face.angle,
                            face.keypoints, face.refined))
        return out
