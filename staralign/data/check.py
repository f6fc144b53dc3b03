"""``staralign data check ANNOT.tsv --image-dir DIR``: find every problem of a dataset in one pass.

Problems reported, each with the annotation file, line and field:

* rows that do not parse: column count, numbers, NaN, landmark count (against the
  definition, or else the count most rows have), 5-point count, tags;
* bad crop parameters: a crop whose size is far from the landmarks' extent, or
  whose centre is far from them (``scale`` is the face size / 200);
* an empty file, or one with a header line alone;
* images missing, unreadable or empty, and images whose header claims a size beyond
  ``predict``'s limits (decompression bombs: refused from the header, never decoded);
* landmarks far outside their image (by more than ``margin`` times the face size);
* duplicate rows (same image and same landmarks) and duplicate images (identical
  file content under another path, annotated with the same landmarks).

The exit status is 1 when anything was found, 0 otherwise; a summary line ends
the report either way.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..crop import FACE_SIZE
from .annotations import AnnotationError, read_annotations, resolve_image_path

__all__ = ["add_arguments", "check_dataset", "run"]

# A crop (scale * 200 px) this many times smaller or larger than the landmarks' extent is wrong.
CROP_RATIO_RANGE = (0.3, 5.0)
# The landmarks' centre may be at most this fraction of the crop size from the crop centre.
CENTRE_TOLERANCE = 0.5


def _read_image_info(path: Path) -> tuple[tuple[int, int] | None, str, str]:
    """((height, width) or None, content hash, error message).  The size in the header is
    checked before decoding (as ``predict`` does): a decompression bomb is refused, not decoded."""
    from .images import ImageReadError, decode_checked, read_image_bytes

    try:
        data = read_image_bytes(path)
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        image = decode_checked(data, path)
    except ImageReadError as exc:
        return None, "", exc.reason
    return (int(image.shape[0]), int(image.shape[1])), digest, ""


def check_dataset(
    annotation_file: str | Path,
    image_dir: str | Path | None,
    definition: str | None = None,
    margin: float = 0.25,
    check_images: bool = True,
    workers: int = 4,
) -> tuple[list[AnnotationError], int]:
    """All problems of an annotation file (sorted by line), each naming the file, line and
    field, and the number of rows read.  Without a definition, point counts are checked
    against the count most rows have."""
    from ..definitions import get_definition

    path = Path(annotation_file)
    source = str(path)
    num_points = get_definition(definition).num_points if definition else None
    try:
        file = read_annotations(path, num_points=num_points, skip_bad_rows=True)
    except AnnotationError as exc:  # the file itself cannot be read
        return [exc], 0
    problems = list(file.skipped)
    rows = file.annotations
    if not rows and not problems:
        problems.append(AnnotationError(source, 0, "", "no annotation rows (an empty file, or a header alone)"))

    # Crop parameters against the landmarks.
    for a in rows:
        lm = a.landmarks.astype(np.float64)
        crop = a.scale * FACE_SIZE
        extent = float(max(np.ptp(lm[:, 0]), np.ptp(lm[:, 1]), 1e-6))
        ratio = crop / extent
        if not CROP_RATIO_RANGE[0] <= ratio <= CROP_RATIO_RANGE[1]:
            problems.append(AnnotationError(source, a.line, "scale",
                                            f"crop size {crop:.1f} px (scale {a.scale:g}) is {ratio:.2f}x the "
                                            f"landmarks' extent {extent:.1f} px (expected "
                                            f"{CROP_RATIO_RANGE[0]}..{CROP_RATIO_RANGE[1]}x)"))
        centre = (lm.min(0) + lm.max(0)) / 2.0
        off = float(np.hypot(*(centre - np.array(a.center))))
        if off > CENTRE_TOLERANCE * crop:
            problems.append(AnnotationError(source, a.line, "center_w",
                                            f"crop centre ({a.center[0]:g}, {a.center[1]:g}) is {off:.1f} px from "
                                            f"the landmarks' centre ({centre[0]:.1f}, {centre[1]:.1f}), more than "
                                            f"{CENTRE_TOLERANCE:g} x the crop size"))

    # Duplicate rows: same image and same landmarks.
    seen: dict[tuple[str, bytes], int] = {}
    for a in rows:
        key = (a.image_path, np.round(a.landmarks, 2).tobytes())
        if key in seen:
            problems.append(AnnotationError(source, a.line, "", f"duplicate of line {seen[key]} "
                                            f"(same image {a.image_path} and landmarks)"))
        else:
            seen[key] = a.line

    # Images: existence, decoding, landmarks inside, duplicate content.
    if check_images and rows:
        paths = sorted({a.image_path for a in rows})
        resolved = {p: resolve_image_path(p, image_dir) for p in paths}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            infos = dict(zip(paths, pool.map(lambda p: _read_image_info(resolved[p]), paths), strict=True))
        by_hash: dict[tuple[str, bytes], tuple[int, str]] = {}
        for a in rows:
            size, digest, error = infos[a.image_path]
            if size is None:
                problems.append(AnnotationError(source, a.line, "image_path", f"{resolved[a.image_path]}: {error}"))
                continue
            h, w = size
            far = margin * a.scale * FACE_SIZE
            lm = a.landmarks
            outside = ((lm[:, 0] < -far) | (lm[:, 0] > w - 1 + far) | (lm[:, 1] < -far) | (lm[:, 1] > h - 1 + far))
            if outside.any():
                idx = np.nonzero(outside)[0]
                shown = ", ".join(f"{i} ({lm[i, 0]:.1f}, {lm[i, 1]:.1f})" for i in idx[:5])
                more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
                problems.append(AnnotationError(source, a.line, "landmarks_target",
                                                f"{len(idx)} point(s) more than {far:.1f} px outside the "
                                                f"{w}x{h} image: {shown}{more}"))
            key = (digest, np.round(lm, 2).tobytes())
            if key in by_hash and by_hash[key][1] != a.image_path:
                line, other = by_hash[key]
                problems.append(AnnotationError(source, a.line, "image_path",
                                                f"{a.image_path} has the same content as {other} (line {line}) "
                                                f"and the same landmarks: a duplicate face"))
            else:
                by_hash.setdefault(key, (a.line, a.image_path))
    problems.sort(key=lambda p: (p.line, p.field))
    return problems, len(rows) + len(file.skipped)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("annotations", metavar="ANNOT.tsv", help="STAR-format annotation file")
    p.add_argument("--image-dir", default=None, help="folder the image paths are relative to")
    p.add_argument("--definition", default=None,
                   help="landmark definition (WFLW, 300W, COFW, 300VW or a YAML file) to check counts")
    p.add_argument("--margin", type=float, default=0.25,
                   help="how far outside its image a point may lie, as a fraction of the face size")
    p.add_argument("--no-images", action="store_true", help="check the rows only, not the images")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from ..definitions import DefinitionError

    if not Path(args.annotations).is_file():
        raise UserError(f"{args.annotations}: no such annotation file")
    try:
        problems, nrows = check_dataset(args.annotations, args.image_dir, args.definition, args.margin,
                                        not args.no_images, args.workers)
    except DefinitionError as exc:
        raise UserError(str(exc)) from None
    for p in problems:
        print(p)
    lines = {p.line for p in problems if p.line}
    if problems:
        print(f"{args.annotations}: {len(problems)} problem(s) in {len(lines)} row(s) of {nrows}",
              file=sys.stderr)
        return 1
    print(f"{args.annotations}: {nrows} row(s), no problems found")
    return 0
