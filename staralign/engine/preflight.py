"""The check a training run makes before its first step: every problem of its data at once.

Training used to find a bad row, a missing image or a corrupt one when a batch reached it,
seconds or hours in, with a traceback.  Before anything is built, :func:`preflight` parses
every row of the training and validation files, checks that every image file exists, and
decodes a sample of them (a full decode of a large set is ``staralign data check``'s job);
the problems are listed as ``data check`` lists them (file, line, field) in one
:class:`PreflightError`.  A file with no usable rows is an error too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import TrainConfig
from ..data.annotations import AnnotationError, read_annotations, resolve_image_path
from ..definitions import LandmarkDefinition

__all__ = ["DECODE_SAMPLE", "PreflightError", "preflight"]

log = logging.getLogger("staralign.train")

# Images decoded per annotation file (spread evenly over it): enough to catch a wrong
# folder or a wholesale conversion problem without reading a large set twice.
DECODE_SAMPLE = 16
# Problems shown in the error; the rest are counted (data check lists them all).
SHOWN = 50


class PreflightError(ValueError):
    """The training data has problems; the message lists them, one per line."""


def _check_image(path: Path) -> str:
    """'' if ``path`` decodes to a sane image, else why not (header size checked before decoding)."""
    from ..data.images import ImageReadError, decode_checked, read_image_bytes

    try:
        decode_checked(read_image_bytes(path), path)
    except ImageReadError as exc:
        return exc.reason
    return ""


def check_file(path: Path, image_dir: str, definition: LandmarkDefinition, skip_bad_rows: bool,
               sample: int = DECODE_SAMPLE) -> tuple[list[AnnotationError], int]:
    """(problems, usable rows) of one annotation file."""
    source = str(path)
    try:
        file = read_annotations(path, num_points=definition.num_points, skip_bad_rows=True)
    except AnnotationError as exc:
        return [exc], 0
    except OSError as exc:
        return [AnnotationError(source, 0, "", f"cannot read: {exc.strerror or exc}")], 0
    problems: list[AnnotationError] = []
    if file.skipped and skip_bad_rows:
        log.warning("%s: %d bad row(s) will be skipped (first: %s)", path, len(file.skipped), file.skipped[0])
    else:
        problems.extend(file.skipped)
    rows = file.annotations
    if not rows:
        problems.append(AnnotationError(source, 0, "", "no usable rows: nothing to train or validate on"))
        return problems, 0
    first_line: dict[str, int] = {}
    for a in rows:
        first_line.setdefault(a.image_path, a.line)
    present = []
    for image, line in first_line.items():
        resolved = resolve_image_path(image, image_dir)
        if resolved.is_file():
            present.append((image, line, resolved))
        else:
            why = "is a directory, not an image" if resolved.is_dir() else "no such file"
            problems.append(AnnotationError(source, line, "image_path", f"{resolved}: {why}"))
    if present and sample > 0:
        stride = max(1, len(present) // sample)
        for _image, line, resolved in present[::stride][:sample]:
            why = _check_image(resolved)
            if why:
                problems.append(AnnotationError(source, line, "image_path", f"{resolved}: {why}"))
    problems.sort(key=lambda p: p.line)
    return problems, len(rows)


def preflight(config: TrainConfig, definition: LandmarkDefinition) -> str:
    """Raise :class:`PreflightError` listing every problem found in the run's data (see the
    module docstring); return the one line to log when all is well (the trainer checks before
    it touches the run folder, so before its log exists)."""
    from ..data.dataset import find_annotation_file

    dc = config.data
    problems: list[AnnotationError] = []
    counts = []
    files = []
    for name in dict.fromkeys([dc.train_file, dc.val_file]):
        try:
            path = find_annotation_file(dc.annot_dir, definition.name, name)
        except FileNotFoundError as exc:
            problems.append(AnnotationError(str(Path(dc.annot_dir) / name), 0, "", str(exc)))
            continue
        found, n = check_file(path, dc.image_dir, definition, dc.skip_bad_rows)
        problems.extend(found)
        counts.append(f"{path.name} {n} rows")
        files.append(path)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        hint = " ".join(f"staralign data check {f} --image-dir {dc.image_dir or '.'}" for f in files[:1])
        raise PreflightError(f"the training data has {len(problems)} problem(s); nothing was trained:\n{shown}{more}\n"
                             + ("fix them (or pass --skip-bad-rows to skip malformed rows)"
                                if any(p.line for p in problems) else "fix them")
                             + (f"; `{hint}` checks a file in full" if hint else ""))
    decoded = min(DECODE_SAMPLE * len(counts), sum(int(c.split()[1]) for c in counts))
    return f"data checked: {', '.join(counts)}, every image present, {decoded} decoded"
