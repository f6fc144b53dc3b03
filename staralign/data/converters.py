"""Converters from the official WFLW, 300W and COFW downloads to the STAR ``.tsv`` format.

``staralign data convert {wflw,300w,cofw} RAW_DIR --out ANNOT_DIR``.

Crop parameters, as the authors state them: ``scale = min(box width, box height) /
200 * 1.05`` and the centre is the box centre; 300W has no boxes, so the
landmarks' bounding box is used (the rule lives in :mod:`staralign.crop`).  The 5-point column holds the definition's
``five_points`` (eye centres, nose tip, mouth corners).

Coordinates: WFLW lists 0-based pixel coordinates and is copied as is.  300W's
``.pts`` files and COFW's MATLAB arrays are 1-based (the iBUG / MATLAB
convention: the first pixel's centre is 1), and this package's convention is the
original code's: integer coordinates are pixel centres counted from 0.  So by
default 1 is subtracted from 300W and COFW coordinates (landmarks and COFW boxes);
``one_based=False`` (``--keep-origin``) keeps the numbers of the files unchanged.
The authors' code has no converter (it reads ready-made ``.tsv`` files from
ADNet), so this choice is ours and is recorded here.

Malformed raw files raise :class:`RawFormatError`, naming the file, the line (or
MATLAB variable) and the field.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..crop import BOX_MARGIN, FACE_SIZE, box_to_crop, landmark_box  # the crop convention
from ..definitions import LandmarkDefinition, get_definition
from ..progress import progress
from .annotations import (
    WFLW_TAGS,
    Annotation,
    AnnotationError,
    five_points_from_landmarks,
    write_annotations,
)

__all__ = [
    "BOX_MARGIN",
    "FACE_SIZE",
    "IMAGE_EXTENSIONS",
    "add_arguments",
    "run",
    "WFLW_SUBSETS",
    "RawFormatError",
    "box_to_crop",
    "convert_300w",
    "convert_cofw",
    "convert_wflw",
    "read_pts",
    "read_wflw_list",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG", ".BMP")
# Test subsets of WFLW, named by the attribute flag (column order of the official lists).
WFLW_SUBSETS = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")


class RawFormatError(AnnotationError):
    """A malformed raw annotation file: names the file, the line (or variable) and the field."""


def _annotation(image_path: str, landmarks: np.ndarray, box: Sequence[float],
                definition: LandmarkDefinition, tags: tuple[int, ...] = (),
                source: str = "", line: int = 0) -> Annotation:
    scale, center = box_to_crop(*box)
    if not scale > 0:
        raise RawFormatError(source, line, "box", f"empty face box {list(box)}")
    lm = np.asarray(landmarks, np.float32)
    five = five_points_from_landmarks(lm, definition.five_points) if definition.five_points else None
    return Annotation(image_path, lm, scale, center, five, tags, source, line)


# --------------------------------------------------------------------------- WFLW


def read_wflw_list(path: str | os.PathLike, definition: LandmarkDefinition | None = None) -> list[Annotation]:
    """One official WFLW list file (196 coordinates, box x1 y1 x2 y2, 6 flags, image path)."""
    definition = definition or get_definition("WFLW")
    source = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RawFormatError(source, 0, "", f"cannot read: {exc}") from exc
    out = []
    with progress(len(lines), f"convert {Path(path).name}", "line") as bar:
        for lineno, text in enumerate(lines, start=1):
            bar.update(1)
            out.append(_wflw_line(text, lineno, source, definition))
    return [a for a in out if a is not None]


def _wflw_line(text: str, lineno: int, source: str, definition: LandmarkDefinition) -> Annotation | None:
    """One line of a WFLW list file (``None`` for a blank line)."""
    n = definition.num_points
    expected = 2 * n + 4 + len(WFLW_TAGS) + 1
    tok = text.split()
    if not tok:
        return None
    if len(tok) != expected:
        raise RawFormatError(source, lineno, "", f"expected {expected} space-separated values "
                             f"({2 * n} coordinates, 4 box, {len(WFLW_TAGS)} attributes, image "
                             f"path), got {len(tok)}")
    values = []
    for k, t in enumerate(tok[:2 * n + 4]):
        try:
            values.append(float(t))
        except ValueError:
            fld = (f"landmark {k // 2} {'xy'[k % 2]}" if k < 2 * n
                   else f"box {('x1', 'y1', 'x2', 'y2')[k - 2 * n]}")
            raise RawFormatError(source, lineno, fld, f"not a number: {t!r}") from None
    arr = np.array(values)
    if not np.all(np.isfinite(arr)):
        raise RawFormatError(source, lineno, "landmarks", "NaN or infinity")
    flags = []
    for k, t in enumerate(tok[2 * n + 4:2 * n + 4 + len(WFLW_TAGS)]):
        if t not in ("0", "1"):
            raise RawFormatError(source, lineno, f"attribute {WFLW_TAGS[k]}", f"expected 0 or 1, got {t!r}")
        flags.append(int(t))
    x1, y1, x2, y2 = arr[2 * n:]
    if not (x2 > x1 and y2 > y1):
        raise RawFormatError(source, lineno, "box", f"x2 <= x1 or y2 <= y1: {[x1, y1, x2, y2]}")
    return _annotation(tok[-1], arr[:2 * n].reshape(n, 2), (x1, y1, x2, y2), definition,
                       tuple(flags), source, lineno)


def _find_file(root: Path, name: str, hints: Iterable[str]) -> Path:
    for h in hints:
        p = root / h / name
        if p.is_file():
            return p
    found = sorted(root.rglob(name))
    if not found:
        raise FileNotFoundError(f"{name} not found under {root}")
    return found[0]


def convert_wflw(raw_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """WFLW list files -> ``train.tsv``, ``test.tsv`` and ``test_<attribute>.tsv``; row counts."""
    root = Path(raw_dir)
    d = get_definition("WFLW")
    hints = (".", "list_98pt_rect_attr_train_test", "WFLW_annotations/list_98pt_rect_attr_train_test",
             "WFLW/WFLW_annotations/list_98pt_rect_attr_train_test")
    out = Path(out_dir)
    counts: dict[str, int] = {}
    lists = {split: read_wflw_list(_find_file(root, f"list_98pt_rect_attr_{split}.txt", hints), d)
             for split in ("train", "test")}
    for split, anns in lists.items():
        counts[f"{split}.tsv"] = write_annotations(out / f"{split}.tsv", anns)
    for k, name in enumerate(WFLW_SUBSETS):
        subset = [a for a in lists["test"] if a.tags[k] == 1]
        counts[f"test_{name}.tsv"] = write_annotations(out / f"test_{name}.tsv", subset)
    return counts


# --------------------------------------------------------------------------- 300W


def read_pts(path: str | os.PathLike, num_points: int | None = None) -> np.ndarray:
    """An iBUG ``.pts`` file -> (n_points, 2) float64, exactly as written (1-based)."""
    source = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RawFormatError(source, 0, "", f"cannot read: {exc}") from exc
    header: dict[str, str] = {}
    start = None
    for lineno, text in enumerate(lines, start=1):
        t = text.strip()
        if not t:
            continue
        if t == "{":
            start = lineno
            break
        if ":" not in t:
            raise RawFormatError(source, lineno, "header", f"expected 'key: value' or '{{', got {t!r}")
        key, value = t.split(":", 1)
        header[key.strip()] = value.strip()
    if start is None:
        raise RawFormatError(source, len(lines), "{", "no '{' opening the point list")
    if "n_points" not in header:
        raise RawFormatError(source, 1, "n_points", "missing from the header")
    try:
        n = int(header["n_points"])
    except ValueError:
        raise RawFormatError(source, 1, "n_points", f"not an integer: {header['n_points']!r}") from None
    if num_points is not None and n != num_points:
        raise RawFormatError(source, 1, "n_points", f"expected {num_points}, got {n}")
    pts = []
    lineno = start
    for lineno in range(start + 1, len(lines) + 1):
        t = lines[lineno - 1].strip()
        if not t:
            continue
        if t == "}":
            break
        parts = t.split()
        if len(parts) != 2:
            raise RawFormatError(source, lineno, f"point {len(pts)}", f"expected 'x y', got {t!r}")
        try:
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise RawFormatError(source, lineno, f"point {len(pts)}", f"not a number: {t!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise RawFormatError(source, lineno, f"point {len(pts)}", "NaN or infinity")
        pts.append((x, y))
    else:
        raise RawFormatError(source, lineno, "}", "no '}' closing the point list")
    if len(pts) != n:
        raise RawFormatError(source, lineno, "points", f"n_points says {n}, the list has {len(pts)}")
    return np.array(pts, np.float64)


def _find_dir(root: Path, name: str) -> Path:
    if (root / name).is_dir():
        return root / name
    for depth in ("*", "*/*", "*/*/*"):
        for p in sorted(root.glob(f"{depth}/{name}")):
            if p.is_dir():
                return p
    raise FileNotFoundError(f"folder {name!r} not found under {root}")


def _image_for(pts_path: Path) -> Path:
    for ext in IMAGE_EXTENSIONS:
        p = pts_path.with_suffix(ext)
        if p.is_file():
            return p
    raise FileNotFoundError(f"{pts_path}: no image next to it (tried {', '.join(IMAGE_EXTENSIONS)})")


def _read_300w_folder(folder: Path, root: Path, d: LandmarkDefinition, one_based: bool) -> list[Annotation]:
    out = []
    files = sorted(folder.glob("*.pts"))
    if not files:
        raise FileNotFoundError(f"no .pts files in {folder}")
    with progress(len(files), f"convert {folder.relative_to(root).as_posix()}", "file") as bar:
        for f in files:
            lm = read_pts(f, d.num_points) - (1.0 if one_based else 0.0)
            image = _image_for(f)
            out.append(_annotation(image.relative_to(root).as_posix(), lm, landmark_box(lm), d,
                                   source=str(f), line=0))
            bar.update(1)
    return out


def convert_300w(raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 one_based: bool = True) -> dict[str, int]:
    """300W ``.pts`` folders -> ``train.tsv`` (lfpw/trainset + helen/trainset + afw),
    ``test_common.tsv`` (lfpw/testset + helen/testset), ``test_challenge.tsv`` (ibug) and
    ``test.tsv`` (both).  Image paths are relative to ``raw_dir``."""
    root = Path(raw_dir)
    d = get_definition("300W")
    lfpw, helen = _find_dir(root, "lfpw"), _find_dir(root, "helen")

    def read(folder: Path) -> list[Annotation]:
        return _read_300w_folder(folder, root, d, one_based)

    train = read(lfpw / "trainset") + read(helen / "trainset") + read(_find_dir(root, "afw"))
    common = read(lfpw / "testset") + read(helen / "testset")
    challenge = read(_find_dir(root, "ibug"))
    out = Path(out_dir)
    return {
        "train.tsv": write_annotations(out / "train.tsv", train),
        "test_common.tsv": write_annotations(out / "test_common.tsv", common),
        "test_challenge.tsv": write_annotations(out / "test_challenge.tsv", challenge),
        "test.tsv": write_annotations(out / "test.tsv", common + challenge),
    }


# --------------------------------------------------------------------------- COFW


_COFW_VARS = {"train": ("COFW_train_color.mat", "IsTr", "phisTr", "bboxesTr"),
              "test": ("COFW_test_color.mat", "IsT", "phisT", "bboxesT")}


def _read_mat(path: Path, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(images as MATLAB shows them (H, W[, 3]) RGB, phis (n, 87), boxes (n, 4)) from a
    MATLAB 7.3 (HDF5) file, or an older MATLAB file through scipy."""
    img_var, phis_var, box_var = names
    source = str(path)
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is in the cofw extra
        h5py = None
    if h5py is not None and h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            for v in names:
                if v not in f:
                    raise RawFormatError(source, 0, v, f"variable missing (has: {', '.join(sorted(f))})")
            refs = np.asarray(f[img_var]).reshape(-1)
            images = []
            for i, ref in enumerate(refs):
                try:
                    arr = np.asarray(f[ref])
                except (TypeError, ValueError, KeyError) as exc:
                    raise RawFormatError(source, 0, f"{img_var}[{i}]", f"not an image reference: {exc}") from None
                # HDF5 stores MATLAB's column-major arrays transposed: (W, H) or (3, W, H).
                images.append(np.ascontiguousarray(arr.T))
            phis = np.asarray(f[phis_var], np.float64).T
            boxes = np.asarray(f[box_var], np.float64).T
    else:
        from scipy.io import loadmat

        try:
            m = loadmat(path)
        except Exception as exc:
            raise RawFormatError(source, 0, "", f"not a MATLAB file h5py or scipy can read: {exc}") from exc
        for v in names:
            if v not in m:
                raise RawFormatError(source, 0, v, "variable missing")
        images = [np.asarray(x) for x in np.asarray(m[img_var], dtype=object).reshape(-1)]
        phis = np.asarray(m[phis_var], np.float64)
        boxes = np.asarray(m[box_var], np.float64)
    n = len(images)
    if phis.ndim != 2 or phis.shape != (n, 87):
        raise RawFormatError(source, 0, phis_var, f"expected shape ({n}, 87) (29 x, 29 y, 29 occlusion), "
                             f"got {phis.shape}")
    if boxes.ndim != 2 or boxes.shape != (n, 4):
        raise RawFormatError(source, 0, box_var, f"expected shape ({n}, 4) (x y w h), got {boxes.shape}")
    return images, phis, boxes


def convert_cofw(raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 image_out: str | os.PathLike | None = None, one_based: bool = True) -> dict[str, int]:
    """COFW ``.mat`` files -> PNG images under ``image_out`` (default ``out_dir/images``)
    as ``train/0001.png`` ..., and ``train.tsv`` / ``test.tsv`` with paths relative to it."""
    import cv2  # here, not at the top: building the CLI parser must not load OpenCV

    root = Path(raw_dir)
    d = get_definition("COFW")
    out = Path(out_dir)
    img_root = Path(image_out) if image_out is not None else out / "images"
    shift = 1.0 if one_based else 0.0
    counts = {}
    for split, (fname, *names) in _COFW_VARS.items():
        path = root / fname if (root / fname).is_file() else _find_file(root, fname, (".", "COFW"))
        images, phis, boxes = _read_mat(path, names)
        (img_root / split).mkdir(parents=True, exist_ok=True)
        anns = []
        bar = progress(len(images), f"convert {fname}", "image")
        for i, (img, phi, box) in enumerate(zip(images, phis, boxes, strict=True)):
            bar.update(1)
            where = f"{names[0]}[{i}]"
            if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
                raise RawFormatError(str(path), 0, where, f"expected a uint8 grey or RGB image, got "
                                     f"{img.dtype} {img.shape}")
            bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            rel = f"{split}/{i + 1:04d}.png"
            if not cv2.imwrite(str(img_root / rel), bgr):
                raise OSError(f"cannot write {img_root / rel}")
            lm = np.stack([phi[:29], phi[29:58]], 1) - shift
            if not np.all(np.isfinite(lm)):
                raise RawFormatError(str(path), 0, f"{names[1]}[{i}]", "NaN or infinity")
            x, y, w, h = box
            if not (w > 0 and h > 0):
                raise RawFormatError(str(path), 0, f"{names[2]}[{i}]", f"non-positive box size {list(box)}")
            x, y = x - shift, y - shift
            anns.append(_annotation(rel, lm, (x, y, x + w, y + h), d, source=str(path), line=0))
        bar.close()
        counts[f"{split}.tsv"] = write_annotations(out / f"{split}.tsv", anns)
    return counts


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["wflw", "300w", "cofw"], type=str.lower, help="which download")
    p.add_argument("raw_dir", metavar="RAW_DIR",
                   help="the download: WFLW root or its annotation folder; the folder holding afw, "
                        "helen, ibug, lfpw; the folder holding the COFW .mat files")
    p.add_argument("--out", required=True, metavar="ANNOT_DIR", help="where the .tsv files go")
    p.add_argument("--image-out", default=None, metavar="DIR",
                   help="COFW only: where the extracted PNG images go (default ANNOT_DIR/images)")
    p.add_argument("--keep-origin", action="store_true",
                   help="300W/COFW: keep the files' 1-based coordinates instead of subtracting 1")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError

    raw = Path(args.raw_dir)
    if not raw.is_dir():
        raise UserError(f"{raw}: no such folder")
    if args.image_out and args.dataset != "cofw":
        raise UserError("--image-out applies to cofw only (WFLW and 300W images stay where they are)")
    try:
        if args.dataset == "wflw":
            counts = convert_wflw(raw, args.out)
            images = next((p for p in (raw / "WFLW_images", raw.parent / "WFLW_images",
                                       raw.parent.parent / "WFLW_images") if p.is_dir()), None)
        elif args.dataset == "300w":
            counts = convert_300w(raw, args.out, one_based=not args.keep_origin)
            images = raw
        else:
            counts = convert_cofw(raw, args.out, args.image_out, one_based=not args.keep_origin)
            images = Path(args.image_out) if args.image_out else Path(args.out) / "images"
    except (FileNotFoundError, RawFormatError) as exc:
        raise UserError(str(exc)) from None
    for name, n in counts.items():
        print(f"{Path(args.out) / name}: {n} faces")
    hint = str(images) if images is not None else "the WFLW_images folder"
    print(f"use --annot-dir {args.out} --image-dir {hint}")
    return 0
