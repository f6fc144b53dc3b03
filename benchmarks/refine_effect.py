"""What ``--refine`` (a second pass re-cropped from the first pass's landmarks) costs and changes.

    PYTHONPATH=. python benchmarks/refine_effect.py --weights RUN/best.safetensors [--json OUT]

On the 43 faces of ``../shared/faces/dlib-examples`` (68 points per face from dlib's
own predictor: a reference for framing, not ground truth for accuracy), with YuNet
finding the faces, for one pass and for ``refine=True``:

* framing: the crop the network saw against the crop the 300W converter makes from
  the face's 68 points (centre error as a fraction of the face size, the landmark
  box's smaller side; ratio of crop sides);
* landmark change between the passes, as a fraction of the face size;
* the distance to dlib's 68 points (the model's points converted to 68), normalised
  by the outer eye corners (36, 45): read as agreement with dlib, not as accuracy;
* time per image (YuNet plus network), the passes measured alternately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_framing import DEFAULT_FACES, DEFAULT_YUNET, match, read_faces  # noqa: E402

from staralign.crop import BOX_MARGIN, FACE_SIZE, upright_landmark_crop  # noqa: E402
from staralign.inference import LandmarkDetector  # noqa: E402
from staralign.inference.faces import YuNetDetector  # noqa: E402


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
            "worst": round(float(a[np.argmax(np.abs(a - (1.0 if a.mean() > 0.5 else 0.0)))]), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a 98-point WFLW model (staralign .safetensors or .pkl)")
    p.add_argument("--faces", type=Path, default=DEFAULT_FACES, help="folder with dlib's XML files and photos")
    p.add_argument("--yunet", type=Path, default=DEFAULT_YUNET, help="YuNet ONNX file")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each pass per image")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    det = LandmarkDetector.from_checkpoint(args.weights, device="cpu", detector=YuNetDetector(args.yunet),
                                           format="68")
    det.ambiguity = False  # landmarks only: the passes' time is the network's and the detector's
    faces = read_faces(args.faces)
    by_image: dict[str, list[np.ndarray]] = {}
    for name, pts in faces:
        by_image.setdefault(name, []).append(pts)
    stats: dict[str, dict[str, list[float]]] = {
        k: {"center_error": [], "side_ratio": [], "nme_vs_dlib": []} for k in ("one_pass", "refine")}
    change, times = [], {"one_pass": [], "refine": []}
    for name, annotated in by_image.items():
        image = cv2.imread(str(args.faces / name))
        results = {"one_pass": det.detect(image), "refine": det.detect(image, refine=True)}
        for _ in range(max(1, args.repeats)):
            for key, refine in (("one_pass", False), ("refine", True)):
                t0 = time.perf_counter()
                det.detect(image, refine=refine)
                times[key].append((time.perf_counter() - t0) * 1000.0)
        for pts in annotated:
            scale_t, center_t = upright_landmark_crop(pts)
            size = scale_t * FACE_SIZE / BOX_MARGIN
            pair = {}
            for key, found in results.items():
                hit = match([(f.box, f) for f in found], pts)
                if hit is None:
                    continue
                face = hit[1]
                pair[key] = face
                s = stats[key]
                s["center_error"].append(float(np.hypot(*(np.array(face.center) - center_t))) / size)
                s["side_ratio"].append(face.scale / scale_t)
                iod = float(np.linalg.norm(pts[36] - pts[45]))
                s["nme_vs_dlib"].append(float(np.linalg.norm(face.landmarks - pts, axis=1).mean()) / iod)
            if len(pair) == 2:
                change.append(float(np.linalg.norm(pair["refine"].landmarks - pair["one_pass"].landmarks,
                                                   axis=1).mean()) / size)
    result = {
        "weights": str(args.weights), "faces": len(faces),
        "found": {k: len(v["center_error"]) for k, v in stats.items()},
        **{k: {m: _summary(v) for m, v in s.items()} for k, s in stats.items()},
        "landmark_change_over_face_size": _summary(change),
        "ms_per_image_median": {k: round(statistics.median(v), 1) for k, v in times.items()},
        "refine_time_ratio": round(statistics.median(times["refine"]) / statistics.median(times["one_pass"]), 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
