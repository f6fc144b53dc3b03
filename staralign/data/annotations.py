"""The STAR/ADNet metadata ``.tsv`` format, read and written exactly.

One face per line, tab-separated columns::

    image_path  landmarks_5pts  landmarks_target  scale  center_w  center_h  [tags]

``landmarks_5pts`` is 10 comma-separated numbers (eye centres, nose tip, mouth
corners), ``landmarks_target`` 2N comma-separated numbers (x, y pairs, image
pixels), ``scale`` the face size / 200, ``center_*`` the crop centre, and the
optional ``tags`` comma-separated 0/1 attribute flags (WFLW: pose, expression,
illumination, make-up, occlusion, blur).

The original reads these files with a header row, so it silently drops line 1
when that line is a sample; we detect a header instead, and write one so our
files also work with the original code.  Every problem is reported with the
file, the 1-based line and the column name.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import atomic_write

__all__ = [
    "COLUMNS",
    "WFLW_TAGS",
    "Annotation",
    "AnnotationError",
    "AnnotationFile",
    "clean_image_path",
    "five_points_from_landmarks",
    "format_number",
    "read_annotations",
    "resolve_image_path",
    "write_annotations",
]

COLUMNS = ("image_path", "landmarks_5pts", "landmarks_target", "scale", "center_w", "center_h", "tags")
WFLW_TAGS = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")

# Path prefixes the original strips (its WFLW test list and training lists carry them).
_WFLW_TEST_PREFIX = "//msr-facestore/Workspace/MSRA_EP_Allergan/users/yanghuan/training_data/wflw/rawImages/"
_TRAIN_PREFIX = "./rawImages/"


class AnnotationError(ValueError):
    """A bad row or file: the message names the file, the line and the field."""

    def __init__(self, source: str, line: int, fld: str, message: str) -> None:
        self.source, self.line, self.field = source, line, fld
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: field '{fld}': {message}" if fld else f"{where}: {message}")


@dataclass
class Annotation:
    """One face: landmarks in original image pixels and the crop that frames it."""

    image_path: str  # as written in the file, after the original's clean-ups
    landmarks: np.ndarray  # (N, 2) float32, x then y
    scale: float  # face size / 200 (the crop spans scale * 200 pixels)
    center: tuple[float, float]  # (center_w, center_h)
    five_points: np.ndarray | None = None  # (5, 2) float32
    tags: tuple[int, ...] = ()
    source: str = ""  # file it came from
    line: int = 0  # 1-based line in that file (0 when built in memory)

    @property
    def num_points(self) -> int:
        return int(self.landmarks.shape[0])


@dataclass
class AnnotationFile:
    """The faces read from one file, plus the rows skipped (when asked to skip bad rows)."""

    path: Path
    annotations: list[Annotation]
    skipped: list[AnnotationError] = field(default_factory=list)
    has_header: bool = False

    def __len__(self) -> int:
        return len(self.annotations)

    def __iter__(self):
        return iter(self.annotations)

    def __getitem__(self, i: int) -> Annotation:
        return self.annotations[i]


def clean_image_path(raw: str) -> str:
    """The original's path clean-ups: backslashes to '/', known absolute prefixes stripped."""
    path = raw.strip().replace("\\", "/")
    path = path.replace(_WFLW_TEST_PREFIX, "")
    return path.replace(_TRAIN_PREFIX, "")


def resolve_image_path(image_path: str, image_dir: str | os.PathLike | None) -> Path:
    """Where the image is: absolute paths as they are, others under ``image_dir``."""
    path = Path(image_path)
    if path.is_absolute() or not image_dir:
        return path
    return Path(image_dir) / path


def format_number(value: float) -> str:
    """Shortest text that reads back to the same float32 (exact labels stay exact)."""
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def five_points_from_landmarks(landmarks: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """(5, 2) points, each the mean of a group of landmark indices (a definition's five_points)."""
    return np.stack([landmarks[list(g)].mean(axis=0) for g in groups]).astype(np.float32)


def _numbers(text: str, source: str, line: int, fld: str, count: int | None) -> np.ndarray:
    parts = [p for p in text.strip().split(",")] if text.strip() else []
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise AnnotationError(source, line, fld, f"not a number: {bad!r}") from None
    if count is not None and values.size != count:
        raise AnnotationError(source, line, fld, f"expected {count} numbers, got {values.size}")
    if values.size % 2:
        raise AnnotationError(source, line, fld, f"expected x,y pairs, got an odd count {values.size}")
    if not np.all(np.isfinite(values)):
        raise AnnotationError(source, line, fld, "contains NaN or infinity")
    return values.reshape(-1, 2).astype(np.float32)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _scalar(text: str, source: str, line: int, fld: str, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(source, line, fld, f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(source, line, fld, "NaN or infinity")
    if positive and value <= 0:
        raise AnnotationError(source, line, fld, f"must be positive, got {value}")
    return value


def _looks_like_header(cols: list[str]) -> bool:
    # A header's landmark column holds a name, not numbers; a sample's holds numbers
    # (a sample with a bad number elsewhere is still a sample, and gets reported).
    if len(cols) < 3:
        return False
    parts = [p for p in cols[2].split(",") if p.strip()]
    return not parts or not all(_is_float(p) for p in parts)


def parse_row(
    text: str, source: str, line: int, num_points: int | None = None
) -> Annotation:
    """One tab-separated row to an Annotation, or AnnotationError naming the column."""
    cols = text.rstrip("\r\n").split("\t")
    if len(cols) < 6:
        raise AnnotationError(source, line, "", f"expected at least 6 tab-separated columns "
                              f"({', '.join(COLUMNS[:6])}), got {len(cols)}")
    if len(cols) > 7:
        raise AnnotationError(source, line, "", f"expected at most 7 columns, got {len(cols)}")
    image_path = clean_image_path(cols[0])
    if not image_path:
        raise AnnotationError(source, line, "image_path", "empty")
    five = _numbers(cols[1], source, line, "landmarks_5pts", 10) if cols[1].strip() else None
    expected = None if num_points is None else 2 * num_points
    landmarks = _numbers(cols[2], source, line, "landmarks_target", expected)
    if landmarks.shape[0] == 0:
        raise AnnotationError(source, line, "landmarks_target", "no landmarks")
    scale = _scalar(cols[3], source, line, "scale", positive=True)
    cw = _scalar(cols[4], source, line, "center_w")
    ch = _scalar(cols[5], source, line, "center_h")
    tags: tuple[int, ...] = ()
    if len(cols) == 7 and cols[6].strip():
        try:
            tags = tuple(int(float(t)) for t in cols[6].split(","))
        except ValueError:
            raise AnnotationError(source, line, "tags", f"expected comma-separated 0/1 flags, "
                                  f"got {cols[6]!r}") from None
        if any(t not in (0, 1) for t in tags):
            raise AnnotationError(source, line, "tags", f"flags must be 0 or 1, got {cols[6]!r}")
    return Annotation(image_path, landmarks, scale, (cw, ch), five, tags, source, line)


def read_annotations(
    path: str | os.PathLike,
    num_points: int | None = None,
    skip_bad_rows: bool = False,
) -> AnnotationFile:
    """Read a metadata file.  Bad rows raise AnnotationError, or with ``skip_bad_rows`` are
    collected in ``.skipped`` (the caller reports how many).

    Without ``num_points`` every row must have the same number of points; with
    ``skip_bad_rows`` the rows whose count differs from the one most rows have are skipped.
    """
    path = Path(path)
    source = str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AnnotationError(source, 0, "", f"cannot read annotation file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(source, 0, "", f"not UTF-8 text: {exc}") from exc
    out = AnnotationFile(path, [])
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if lineno == 1 and _looks_like_header(text.split("\t")):
            out.has_header = True
            continue
        try:
            out.annotations.append(parse_row(text, source, lineno, num_points))
        except AnnotationError as exc:
            if not skip_bad_rows:
                raise
            out.skipped.append(exc)
    counts = Counter(a.num_points for a in out.annotations)
    if num_points is None and len(counts) > 1:
        if not skip_bad_rows:
            first = out.annotations[0].num_points
            odd = next(a for a in out.annotations if a.num_points != first)
            raise AnnotationError(source, odd.line, "landmarks_target",
                                  f"{odd.num_points} points here but {first} on line "
                                  f"{out.annotations[0].line}")
        majority, many = counts.most_common(1)[0]
        out.skipped += [AnnotationError(source, a.line, "landmarks_target",
                                        f"{a.num_points} points, but {many} of {len(out.annotations)} "
                                        f"rows have {majority}")
                        for a in out.annotations if a.num_points != majority]
        out.skipped.sort(key=lambda e: e.line)
        out.annotations = [a for a in out.annotations if a.num_points == majority]
    return out


def format_row(a: Annotation) -> str:
    def join(points: np.ndarray) -> str:
        return ",".join(format_number(v) for v in np.asarray(points, np.float32).reshape(-1))

    cols = [
        a.image_path,
        join(a.five_points) if a.five_points is not None else "",
        join(a.landmarks),
        format_number(a.scale),
        format_number(a.center[0]),
        format_number(a.center[1]),
    ]
    if a.tags:
        cols.append(",".join(str(int(t)) for t in a.tags))
    for c in cols:
        if "\t" in c or "\n" in c:
            raise ValueError(f"cannot write {c!r}: tabs and newlines are not allowed in a column")
    return "\t".join(cols)


def write_annotations(path: str | os.PathLike, annotations: Iterable[Annotation], header: bool = True) -> int:
    """Write faces to a metadata file atomically; returns the number of rows."""
    rows = [format_row(a) for a in annotations]
    lines = (["\t".join(COLUMNS)] if header else []) + rows
    atomic_write(path, "".join(line + "\n" for line in lines))
    return len(rows)
