"""Write a synthetic WFLW-style dataset: images, STAR ``.tsv`` label files, side files.

Layout of ``OUT`` (image paths in the tsv files are relative to ``OUT``, so
``--image-dir OUT --annot-dir OUT`` works)::

    OUT/images/train/000000.jpg ...    OUT/images/test/000000.jpg ...
    OUT/train.tsv  OUT/test.tsv        98 WFLW points, 5 points, scale, centre, 6 tags
    OUT/{split}_exact.npy              (M, 98, 2) float32 exact landmarks (== test labels)
    OUT/{split}_tangents.npy           (M, 98, 2) float32 unit contour tangents, image px
    OUT/{split}_visible.npy            (M, 98) bool: not under an occluder or eyelid
    OUT/synth.yaml                     everything needed to regenerate the dataset; written
                                       last (and removed first): without it the data is incomplete

Sample ``i`` of a split depends only on ``(seed, split, i)``: its image comes from
``numpy.random.default_rng([seed, split_id, i])`` and its label noise from
``default_rng([seed, split_id, i, 1])``.  So the work can be split across processes in
any way, and datasets that differ only in ``--ambiguity`` share their images.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from ..._io import atomic_write
from ...definitions import get_definition
from ..annotations import WFLW_TAGS, Annotation, five_points_from_landmarks, write_annotations
from .geometry import CORNER_IDS, PUPIL_IDS
from .labels import CORNER_FACTOR, ambiguous_landmarks
from .params import TAG_THRESHOLDS
from .render import render_face

__all__ = ["GENERATOR_VERSION", "IMAGE_FORMATS", "SPLITS", "generate_dataset", "make_sample", "sample_rngs"]

# Bump when a change makes the same (seed, split, i) render differently.
GENERATOR_VERSION = 1
SPLITS = {"train": 0, "test": 1}
# The image files the writer can make, with the encoder settings of each: JPEG at quality
# 95 without chroma subsampling (4:4:4), or lossless PNG at the fastest compression.
_ENCODER_PARAMS = {
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 1],
}
IMAGE_FORMATS = tuple(_ENCODER_PARAMS)


def sample_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator,
                                                             np.random.Generator]:
    """The two independent generators of one sample: (image, label noise)."""
    sid = SPLITS[split]
    return (np.random.default_rng([seed, sid, index]),
            np.random.default_rng([seed, sid, index, 1]))


def make_sample(seed: int, split: str, index: int, size: int = 256,
                ambiguity: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Image, *label* landmarks and info of sample ``index`` of ``split``.

    Test labels are always exact; training labels carry the ambiguity noise.  The
    exact landmarks are ``info["landmarks"]``.
    """
    rng_img, rng_label = sample_rngs(seed, split, index)
    image, exact, info = render_face(rng_img, size)
    info["landmarks"] = exact
    sigma = ambiguity if split == "train" else 0.0
    labels = ambiguous_landmarks(exact, info["curves"], sigma, rng_label, iod=info["iod"],
                                 kinds=info["kinds"])
    return image, labels, info


def _encode(image: np.ndarray, fmt: str) -> bytes:
    ok, buf = cv2.imencode("." + fmt, image, _ENCODER_PARAMS[fmt])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


_Job = tuple[str, int, str, int, int, int, float, str]  # out, seed, split, start, stop, ...


def _work(job: _Job) -> list[dict[str, Any]]:
    """Render, save and describe samples [start, stop) of one split (runs in workers)."""
    out_dir, seed, split, start, stop, size, ambiguity, fmt = job
    rows = []
    for i in range(start, stop):
        image, labels, info = make_sample(seed, split, i, size, ambiguity)
        rel = f"images/{split}/{i:06d}.{fmt}"
        (Path(out_dir) / rel).write_bytes(_encode(image, fmt))
        rows.append({"path": rel, "labels": labels, "exact": info["landmarks"],
                     "tangents": info["tangents"], "visible": info["visible"],
                     "scale": info["scale"], "center": info["center"], "tags": info["tags"]})
    return rows


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def generate_dataset(out_dir: str | os.PathLike, train: int = 1000, test: int = 200,
                     ambiguity: float = 0.0, seed: int = 0, size: int = 256, workers: int = 1,
                     image_format: str = "jpg", progress: bool = False) -> dict[str, Any]:
    """Generate a synthetic dataset under ``out_dir`` (layout in the module docstring).

    ``ambiguity`` is the label-noise sigma in inter-ocular distances for the training
    labels (test labels are exact).  Returns a summary (counts, seconds, images/s).
    The output is identical for any ``workers``.
    """
    if train < 0 or test < 0:
        raise ValueError(f"sample counts must be >= 0, got train={train}, test={test}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if ambiguity < 0:
        raise ValueError(f"ambiguity must be >= 0, got {ambiguity}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out = Path(out_dir)
    (out / "synth.yaml").unlink(missing_ok=True)  # until the new one is written, the data is incomplete
    definition = get_definition("WFLW")
    counts = {"train": int(train), "test": int(test)}
    t0 = time.perf_counter()
    jobs: list[_Job] = []
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        chunk = max(1, min(64, -(-n // max(1, 4 * workers))))
        jobs += [(str(out), int(seed), split, s, min(n, s + chunk), int(size), float(ambiguity),
                  image_format) for s in range(0, n, chunk)]
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    total = counts["train"] + counts["test"]
    from ...progress import progress as make_progress

    bar = make_progress(total, "synth", "face", enabled=progress)

    def report() -> None:
        bar.update(sum(len(v) for v in rows.values()) - bar.n)

    try:
        if workers > 1 and len(jobs) > 1:
            # forkserver, not fork: a forked child inherits OpenCV's thread pool in a
            # broken state when the parent already used OpenCV, and can hang.
            with mp.get_context("forkserver" if os.name == "posix" else "spawn").Pool(
                    workers, initializer=_init_worker) as pool:
                for job, result in zip(jobs, pool.imap(_work, jobs), strict=True):
                    rows[job[2]].extend(result)
                    report()
        else:
            for job in jobs:
                rows[job[2]].extend(_work(job))
                report()
    finally:
        bar.close()

    for split, split_rows in rows.items():
        anns = [Annotation(r["path"], r["labels"], r["scale"], r["center"],
                           five_points_from_landmarks(r["labels"], definition.five_points),
                           tuple(r["tags"])) for r in split_rows]
        write_annotations(out / f"{split}.tsv", anns)
        shape = (0, definition.num_points, 2)
        for key, dtype in (("exact", np.float32), ("tangents", np.float32)):
            arr = np.stack([r[key] for r in split_rows]).astype(dtype) if split_rows else \
                np.zeros(shape, dtype)
            np.save(out / f"{split}_{key}.npy", arr)
        vis = np.stack([r["visible"] for r in split_rows]) if split_rows else \
            np.zeros(shape[:2], bool)
        np.save(out / f"{split}_visible.npy", vis)
    seconds = time.perf_counter() - t0
    config = {
        "generator": "staralign.data.synth",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "train": counts["train"],
        "test": counts["test"],
        "size": int(size),
        "ambiguity": float(ambiguity),
        "ambiguity_corner_factor": CORNER_FACTOR,
        "image_format": image_format,
        "definition": "WFLW",
        "tags": list(WFLW_TAGS),
        "tag_thresholds": dict(TAG_THRESHOLDS),
        "corner_points": list(CORNER_IDS),
        "pupil_points": list(PUPIL_IDS),
        "rng": "image: default_rng([seed, split_id, i]); label noise: default_rng([seed, "
               "split_id, i, 1]); split_id train=0, test=1",
        "files": {
            "train": "train.tsv", "test": "test.tsv",
            "exact_landmarks": "{split}_exact.npy",
            "tangents": "{split}_tangents.npy",
            "visible": "{split}_visible.npy",
        },
    }
    atomic_write(out / "synth.yaml", yaml.safe_dump(config, sort_keys=False))  # written last: data complete
    return {"out_dir": str(out), **counts, "seconds": seconds,
            "images_per_second": total / seconds if seconds > 0 else float("inf")}

