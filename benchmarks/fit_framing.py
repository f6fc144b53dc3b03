"""Fit and measure how the face detectors' output maps onto the training crop.

    PYTHONPATH=. python benchmarks/fit_framing.py [--faces DIR] [--yunet FILE] [--json OUT]

On the 43 faces of ``../shared/faces/dlib-examples`` (dlib's example photos with 68
points per face, see that folder's README: good enough for framing, not for
landmark accuracy) this computes, for each face, the crop the 300W converter
would make from its 68 points (:func:`staralign.crop.upright_landmark_crop` with
angle 0: the landmarks' box, ``scale = min side / 200 * 1.05``), runs YuNet and
the Haar cascade on the photo, matches each face to the detection whose box holds
the landmarks' centre (largest overlap), and fits by least squares:

* YuNet (:class:`~staralign.inference.faces.KeypointFraming`): crop side
  ``= a * eye_mouth + b * eye_eye``; centre offset from the eyes' midpoint in the
  face's frame: along ``v`` ``= c_v * side``, along ``u`` ``= c_u * side + c_n * nose_u``;
* Haar and, for comparison, YuNet's box alone (:class:`~staralign.inference.faces.BoxFraming`):
  ``expand`` by least squares, ``shift_x``, ``shift_y`` as means;
* and YuNet without its roll search, for comparison.

Each photo is also turned about each face (``--tilts``, default -30, 0, +30 degrees)
and the target turned with it, so the fit and the errors cover tilted heads; the
roll error is the crop's angle against the turn (the converter's crops are
axis-aligned, so on untilted photos it includes the heads' own roll).  Haar's
framing uses the untilted photos only (the frontal cascade finds few turned faces).

It prints JSON: the fitted constants (copy them into staralign/inference/faces.py),
and per detector the faces found and the framing error with those constants, in
sample and leave-one-out (every tilted copy of a face left out together): centre
error as a fraction of the face size (the landmark box's smaller side), the ratio of
crop sides (detector / converter), mean and worst, and the roll error.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from staralign.crop import BOX_MARGIN, FACE_SIZE, upright_landmark_crop
from staralign.inference.faces import (
    IDENTITY,
    BoxFraming,
    HaarDetector,
    KeypointFraming,
    YuNetDetector,
    keypoint_frame,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FACES = ROOT.parent / "shared" / "faces" / "dlib-examples"
SYNTHETIC_HAAR = BoxFraming(expand=0.89, shift_x=0.0, shift_y=0.18)  # calibrate_framing's, kept for comparison
DEFAULT_YUNET = ROOT.parent / "shared" / "models" / "face_detection_yunet_2026may.onnx"


def read_faces(folder: Path) -> list[tuple[str, np.ndarray]]:
    """(image file, (68, 2) points) for every face in the folder's two dlib XML files."""
    out = []
    for xml in ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"):
        for image in ET.parse(folder / xml).getroot().iter("image"):
            for box in image.iter("box"):
                parts = sorted(box.iter("part"), key=lambda p: int(p.get("name")))
                pts = np.array([[float(p.get("x")), float(p.get("y"))] for p in parts])
                out.append((image.get("file"), pts))
    return out


def match(detections: list, points: np.ndarray):
    """The detection whose box holds the landmarks' box centre and overlaps it most, or None."""
    (x1, y1), (x2, y2) = points.min(0), points.max(0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    best, best_iou = None, 0.0
    for d in detections:
        b = d[0]
        if not (b[0] < cx < b[2] and b[1] < cy < b[3]):
            continue
        iw = max(0.0, min(x2, b[2]) - max(x1, b[0]))
        ih = max(0.0, min(y2, b[3]) - max(y1, b[1]))
        inter = iw * ih
        iou = inter / ((x2 - x1) * (y2 - y1) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
        if iou > best_iou:
            best, best_iou = d, iou
    return best


def fit_keypoints(rows: list[dict]) -> KeypointFraming:
    kf = [keypoint_frame(r["keypoints"]) for r in rows]
    side_t = np.array([r["scale"] * FACE_SIZE for r in rows])
    a = np.array([[f["eye_mouth"], f["eye_eye"]] for f in kf])
    (sa, sb), *_ = np.linalg.lstsq(a, side_t, rcond=None)
    side = a @ np.array([sa, sb])
    off = np.array([np.array(r["center"]) - f["eyes"] for r, f in zip(rows, kf, strict=True)])
    du = np.array([o @ f["u"] for o, f in zip(off, kf, strict=True)])
    dv = np.array([o @ f["v"] for o, f in zip(off, kf, strict=True)])
    cv_ = float(side @ dv / (side @ side))
    (cu, cn), *_ = np.linalg.lstsq(np.stack([side, [f["nose_u"] for f in kf]], 1), du, rcond=None)
    return KeypointFraming(float(sa), float(sb), float(cu), cv_, float(cn))


def fit_box(rows: list[dict]) -> BoxFraming:
    boxes = np.array([r["box"] for r in rows])
    side_d = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    side_t = np.array([r["scale"] * FACE_SIZE / BOX_MARGIN for r in rows])
    expand = float(side_d @ side_t / (side_d @ side_d))
    c_d = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    shift = ((np.array([r["center"] for r in rows]) - c_d) / side_d[:, None]).mean(0)
    return BoxFraming(expand, float(shift[0]), float(shift[1]))


def errors(rows: list[dict], framings: list) -> dict:
    """Centre error / face size, side ratio and roll error (degrees) of each face under its framing;
    overall and, for the centre and roll, per tilt."""
    cerr, ratio, aerr = [], [], []
    for r, fr in zip(rows, framings, strict=True):
        scale, center, angle = fr.place(r["box"], r.get("keypoints"))
        face = r["scale"] * FACE_SIZE / BOX_MARGIN
        cerr.append(float(np.hypot(*(np.array(center) - r["center"]))) / face)
        ratio.append(scale / r["scale"])
        aerr.append(abs((angle - r["angle"] + 180.0) % 360.0 - 180.0))
    cerr, ratio, aerr = np.array(cerr), np.array(ratio), np.array(aerr)
    worst = ratio[np.argmax(np.abs(np.log(ratio)))]
    tilts = np.array([r["tilt"] for r in rows])
    return {"center_error_mean": round(float(cerr.mean()), 4), "center_error_worst": round(float(cerr.max()), 4),
            "side_ratio_mean": round(float(ratio.mean()), 4), "side_ratio_worst": round(float(worst), 4),
            "side_ratio_abs_log_mean": round(float(np.abs(np.log(ratio)).mean()), 4),
            "roll_error_deg_mean": round(float(aerr.mean()), 2),
            "per_tilt": {str(t): {"faces": int((tilts == t).sum()),
                                  "center_error_mean": round(float(cerr[tilts == t].mean()), 4),
                                  "roll_error_deg_mean": round(float(aerr[tilts == t].mean()), 2)}
                         for t in sorted(set(tilts.tolist()))}}


def report(rows: list[dict], fit) -> dict:
    """Fit on all rows; leave-one-out leaves out every tilted copy of the face."""
    framing = fit(rows)
    by_face: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_face.setdefault(r["face"], []).append(i)
    loo: list = [None] * len(rows)
    for idx in by_face.values():
        out = set(idx)
        f = fit([r for i, r in enumerate(rows) if i not in out])
        for i in idx:
            loo[i] = f
    return {"framing": {k: round(v, 4) for k, v in vars(framing).items() if isinstance(v, float)},
            "in_sample": errors(rows, [framing] * len(rows)), "leave_one_out": errors(rows, loo)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=Path, default=DEFAULT_FACES, help="folder with dlib's two XML files and photos")
    p.add_argument("--yunet", type=Path, default=DEFAULT_YUNET, help="YuNet ONNX file")
    p.add_argument("--tilts", default="-30,0,30", metavar="DEG,...",
                   help="each photo is also turned about each face by these angles (cv2's sense: "
                        "counter-clockwise on screen); default -30,0,30")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    faces = read_faces(args.faces)
    tilts = [float(t) for t in args.tilts.split(",")]
    detectors = {"yunet": YuNetDetector(args.yunet, framing=IDENTITY),
                 "yunet_no_roll_search": YuNetDetector(args.yunet, framing=IDENTITY, roll_search=None),
                 "haar": HaarDetector(framing=IDENTITY)}
    found: dict[str, list[dict]] = {k: [] for k in detectors}
    images: dict[str, np.ndarray] = {}
    for index, (name, pts) in enumerate(faces):
        if name not in images:
            images[name] = cv2.imread(str(args.faces / name))
        image = images[name]
        for tilt in tilts:
            turn = cv2.getRotationMatrix2D(tuple(float(v) for v in pts.mean(0)), tilt, 1.0)
            turned = cv2.warpAffine(image, turn, image.shape[1::-1], flags=cv2.INTER_LINEAR) if tilt else image
            pts_t = pts @ turn[:, :2].T + turn[:, 2]
            # The target: the 300W converter's crop of the untilted photo, turned with it
            # (its roll is -tilt in this package's clockwise sense).
            scale, center = upright_landmark_crop(pts_t, -tilt)
            for key, det in detectors.items():
                d = match(det(turned), pts_t)
                if d is not None:
                    row = {"face": index, "file": name, "tilt": tilt, "scale": scale, "center": np.array(center),
                           "angle": -tilt, "box": d[0]}
                    if len(d) > 2:
                        row["keypoints"] = d[2]
                    found[key].append(row)
    box_only = [{k: v for k, v in r.items() if k != "keypoints"} for r in found["yunet"]]
    haar_upright = [r for r in found["haar"] if r["tilt"] == 0]
    result = {
        "faces": len(faces), "tilts": tilts,
        "yunet_keypoints": {"found": len(found["yunet"]), **report(found["yunet"], fit_keypoints)},
        "yunet_keypoints_no_roll_search": {"found": len(found["yunet_no_roll_search"]),
                                           **report(found["yunet_no_roll_search"], fit_keypoints)},
        "yunet_box_only": {"found": len(box_only), **report(box_only, fit_box)},
        # The frontal cascade finds few turned faces (and some of those matches are wrong
        # boxes), so its framing is fitted and measured on the untilted photos.
        "haar": {"found_per_tilt": {str(t): sum(r["tilt"] == t for r in found["haar"]) for t in tilts},
                 "found": len(haar_upright), **report(haar_upright, fit_box)},
        "haar_synthetic_framing_upright": {  # the framing measured on synthetic faces before this fit
            "framing": vars(SYNTHETIC_HAAR), **errors(haar_upright, [SYNTHETIC_HAAR] * len(haar_upright))},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
