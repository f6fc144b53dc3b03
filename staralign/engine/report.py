"""Evaluation output: the printed table, the JSON summary and the report directory.

A report directory holds, for one or several compared runs on the same faces:

``metrics.json``          the JSON summary (also what ``staralign test --json`` writes)
``ced.png``               cumulative error distribution, every run on one plot
``per_landmark_nme.png``  mean NME of each landmark, per run (bars for one, lines for several)
``per_landmark.csv``      the same numbers
``per_sample.csv``        one row per face: index, row, image, subset flags, NME of each run
``worst_<run>.png``       the run's worst faces: ground truth (yellow rings) vs prediction (red dots) on the crop
                          (``write_face_grid`` draws any chosen faces that way)

Every file is written beside its final name and renamed over it, so an
interrupted run never leaves a half-written file under a final name.  Plots use
matplotlib's Agg canvas directly: no global backend switch, no display needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, finite_json
from ..data.testsets import FULL, TestSet
from .scoring import EvalResult

__all__ = [
    "FORMAT_NAME",
    "build_summary",
    "format_table",
    "json_text",
    "norm_description",
    "plot_ced",
    "plot_per_landmark",
    "safe_name",
    "write_face_grid",
    "write_json",
    "write_per_landmark_csv",
    "write_per_sample_csv",
    "write_report",
    "write_worst_grid",
]

FORMAT_NAME = "staralign.evaluation"
FORMAT_VERSION = 1
MIN_TILE = 256  # worst-face tiles are drawn at least this large, whatever the network's input


# --------------------------------------------------------------------------- files


def json_text(data: dict) -> str:
    """Strict JSON text (non-finite numbers as null)."""
    return json.dumps(finite_json(data), indent=2) + "\n"


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """:func:`json_text`, written atomically."""
    return atomic_write(path, json_text(data))


def safe_name(label: str) -> str:
    """A run label as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "run"


# --------------------------------------------------------------------------- summary and table


def norm_description(definition, norm: str) -> str:
    """Human words for a normalisation: which points (or the box) divide the error."""
    if norm == "box":
        return "box: sqrt(width * height) of the ground-truth landmarks' bounding box"
    idx = definition.norm_indices(norm)

    def group(g: tuple[int, ...]) -> str:
        return str(g[0]) if len(g) == 1 else "mean(" + ",".join(map(str, g)) + ")"

    return f"{norm}: distance between points {group(idx.left)} and {group(idx.right)}"


def build_summary(
    results: Sequence[EvalResult],
    test_set: TestSet,
    thresholds: Sequence[float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON summary: settings shared by the runs, then ``runs`` keyed by run label.

    Each run holds ``nme``, ``fr``, ``auc``, ``threshold``, ``norm``, ``count``,
    ``by_threshold`` and ``subsets`` (the same keys per subset), plus where its
    weights came from and how long it took.
    """
    if not results:
        raise ValueError("no results to summarise")
    first = results[0]
    out: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "definition": first.definition.name,
        "test_files": list(test_set.files),
        "count": len(test_set),
        "space": first.space,
        "norm": first.norm,
        "norm_description": norm_description(first.definition, first.norm),
        "flip_test": first.flip_test,
        "thresholds": [float(t) for t in thresholds],
        "sets": test_set.rows(),
    }
    if extra:
        out.update(extra)
    runs: dict[str, Any] = {}
    for r in results:
        n = len(r.nmes)
        runs[r.label] = {
            "checkpoint": r.checkpoint,
            "input_size": r.input_size,
            "seconds": r.seconds,
            "faces_per_second": n / r.seconds if r.seconds > 0 else None,
            **r.metrics(thresholds),
        }
    out["runs"] = runs
    return out


def _set_metrics(run: dict, name: str) -> dict:
    return run if name == FULL else run["subsets"][name]


def _fmt(value: float | None, scale: float, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * scale:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """The paper-style table of a summary: one row per set, one column group per run.

    NME and FR in percent, AUC as a fraction, as the paper prints them.
    """
    runs = summary["runs"]
    thresholds = summary["thresholds"]
    metric_names = ["NME %"] + [f"FR@{t:g} %" for t in thresholds] + [f"AUC@{t:g}" for t in thresholds]
    sets = summary["sets"]
    first_run = next(iter(runs.values()))
    rows: list[list[str]] = []
    for name in sets:
        cells = [name, str(_set_metrics(first_run, name)["count"])]
        for run in runs.values():
            m = _set_metrics(run, name)
            cells.append(_fmt(m["nme"], 100, 2))
            cells += [_fmt(m["by_threshold"][f"{t:g}"]["fr"], 100, 2) for t in thresholds]
            cells += [_fmt(m["by_threshold"][f"{t:g}"]["auc"], 1, 4) for t in thresholds]
        rows.append(cells)
    header = ["set", "faces"] + metric_names * len(runs)
    widths = [max(len(header[k]), *(len(r[k]) for r in rows)) for k in range(len(header))]
    group = len(metric_names)
    group_widths = [sum(widths[2 + g * group: 2 + (g + 1) * group]) + 2 * (group - 1) for g in range(len(runs))]
    labels = list(runs)
    for g, label in enumerate(labels):  # a long run label widens its group's last column
        extra = len(label) - group_widths[g]
        if extra > 0:
            widths[2 + (g + 1) * group - 1] += extra
            group_widths[g] += extra

    def line(cells: list[str]) -> str:
        left = f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}"
        parts = []
        for g in range(len(runs)):
            cols = range(2 + g * group, 2 + (g + 1) * group)
            parts.append("  ".join(f"{cells[k]:>{widths[k]}}" for k in cols))
        return left + " | " + " | ".join(parts)

    lead = " " * (widths[0] + 2 + widths[1])
    title = lead + " | " + " | ".join(f"{label:^{w}}" for label, w in zip(labels, group_widths, strict=True))
    files = ", ".join(Path(f).name for f in summary["test_files"])
    head = [
        f"{summary['definition']}: {summary['count']} faces from {files}"
        f"; {summary['space']} space; NME normalised by {summary['norm_description']}"
        f"; flip test {'on' if summary['flip_test'] else 'off'}",
        title,
        line(header),
        "-" * len(line(header)),
    ]
    return "\n".join(head + [line(r) for r in rows])


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def plot_ced(results: Sequence[EvalResult], path: str | os.PathLike, threshold: float) -> list[str]:
    """Every run's cumulative error distribution up to ``threshold`` on one plot; returns the
    legend entries (one per run, in order)."""
    from ..metrics import ced_curve, fr_auc

    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    legend = []
    for r in results:
        xs, ys = ced_curve(r.nmes, threshold)
        fr, auc = fr_auc(r.nmes, threshold)
        entry = f"{r.label}: NME {100 * float(np.mean(r.nmes)):.2f}%, FR {100 * fr:.2f}%, AUC {auc:.4f}"
        ax.plot(xs, ys, label=entry, linewidth=1.5)
        legend.append(entry)
    ax.set_xlim(0, threshold)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"NME ({results[0].norm}, {results[0].space} space)")
    ax.set_ylabel("fraction of faces")
    ax.set_title(f"Cumulative error distribution ({results[0].definition.name}, threshold {threshold:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    return legend


def plot_per_landmark(results: Sequence[EvalResult], path: str | os.PathLike) -> list[str]:
    """Mean NME (%) of each landmark index, per run; returns the legend entries."""
    fig = _figure(max(6.4, 0.09 * results[0].errors.shape[1] + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    n = results[0].errors.shape[1]
    idx = np.arange(n)
    legend = []
    for r in results:
        values = 100 * r.per_landmark()
        if len(results) == 1:
            ax.bar(idx, values, width=0.8, label=r.label)
        else:
            ax.plot(idx, values, marker="o", markersize=2.5, linewidth=1, label=r.label)
        legend.append(r.label)
    ax.set_xlim(-1, n)
    ax.set_xlabel("landmark index")
    ax.set_ylabel(f"mean NME % ({results[0].norm})")
    ax.set_title(f"Per-landmark error ({results[0].definition.name}, {results[0].space} space)")
    step = 5 if n <= 70 else 10
    ax.set_xticks(np.arange(0, n, step))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    return legend


# --------------------------------------------------------------------------- tables of numbers


def _subset_columns(test_set: TestSet) -> list[str]:
    return list(test_set.subsets)


def write_per_sample_csv(results: Sequence[EvalResult], test_set: TestSet, path: str | os.PathLike) -> Path:
    """One row per face: ``index``, ``row`` (file:line), ``image``, 0/1 subset flags and
    ``nme_<run>`` for every run."""
    indices = results[0].predictions.indices
    for r in results[1:]:
        if not np.array_equal(r.predictions.indices, indices):
            raise ValueError("runs to compare must cover the same faces")
    subsets = _subset_columns(test_set)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "row", "image", *subsets, *(f"nme_{r.label}" for r in results)])
    for k, i in enumerate(indices):
        a = test_set.annotations[int(i)]
        row = f"{a.source}:{a.line}" if a.source else ""
        flags = [int(bool(test_set.subsets[s][int(i)])) for s in subsets]
        w.writerow([int(i), row, results[0].predictions.paths[k], *flags,
                    *(f"{float(r.nmes[k]):.8g}" for r in results)])
    return atomic_write(path, buf.getvalue())


def write_per_landmark_csv(results: Sequence[EvalResult], path: str | os.PathLike) -> Path:
    """One row per landmark index, the mean NME of each run."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["landmark", *(f"nme_{r.label}" for r in results)])
    table = [r.per_landmark() for r in results]
    for i in range(results[0].errors.shape[1]):
        w.writerow([i, *(f"{float(t[i]):.8g}" for t in table)])
    return atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- worst faces


def _crop_tile(result: EvalResult, test_set: TestSet, k: int) -> np.ndarray:
    """Face ``k`` of ``result`` (its position in the predictions), drawn on its crop."""
    import cv2

    from ..data.images import read_image
    from ..data.transforms import denormalize_points, transform_points, warp_image
    from ..viz import GROUND_TRUTH_COLOR, OUTLINE_COLOR, PREDICTION_COLOR, draw_landmarks

    size = result.input_size
    index = int(result.predictions.indices[k])
    a = test_set.annotations[index]
    matrix = result.predictions.matrices[k]
    image = read_image(result.predictions.paths[k], a.source, a.line)
    crop = warp_image(image, matrix, size)
    gt = transform_points(a.landmarks.astype(np.float64), matrix.astype(np.float64))
    pred = denormalize_points(result.predictions.pred[k].astype(np.float64), size)
    zoom = max(1.0, MIN_TILE / size)
    if zoom > 1:
        side = int(round(size * zoom))
        crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)
        gt, pred = (gt + 0.5) * zoom - 0.5, (pred + 0.5) * zoom - 0.5
    tile = draw_landmarks(crop, gt, definition=result.definition, color=GROUND_TRUTH_COLOR, hollow=True,
                          outline=OUTLINE_COLOR)
    tile = draw_landmarks(tile, pred, definition=result.definition, color=PREDICTION_COLOR, outline=OUTLINE_COLOR,
                          copy=False)
    text = f"#{index} NME {100 * float(result.nmes[k]):.2f}%"
    scale = tile.shape[0] / 512
    for color, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(tile, text, (4, int(18 * scale * 1.6)), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick,
                    cv2.LINE_AA)
    return tile


def write_face_grid(
    result: EvalResult, test_set: TestSet, path: str | os.PathLike, order: Sequence[int] | np.ndarray,
    cols: int = 4,
) -> list[int]:
    """A grid of the run's faces at positions ``order`` of its predictions, each drawn on its crop:
    ground truth (yellow rings) vs prediction (red dots).  Returns their dataset indices; writes nothing
    when ``order`` is empty."""
    import cv2

    from ..viz import GROUND_TRUTH_COLOR, PREDICTION_COLOR, add_legend, make_grid

    if not len(order):
        return []
    tiles = [_crop_tile(result, test_set, int(k)) for k in order]
    grid = add_legend(make_grid(tiles, cols=cols), [("ground truth", GROUND_TRUTH_COLOR, True),
                                                    (f"prediction ({result.label})", PREDICTION_COLOR, False)])
    ok, buf = cv2.imencode(".png", grid)
    if not ok:
        raise RuntimeError("OpenCV could not encode the face grid")
    atomic_write(path, buf.tobytes())
    return [int(result.predictions.indices[k]) for k in order]


def write_worst_grid(
    result: EvalResult, test_set: TestSet, path: str | os.PathLike, count: int = 16, cols: int = 4
) -> list[int]:
    """A grid of the run's ``count`` highest-NME faces (worst first); returns their dataset indices."""
    nmes = np.nan_to_num(result.nmes, nan=np.inf)
    order = np.argsort(-nmes, kind="stable")[: max(0, int(count))]
    return write_face_grid(result, test_set, path, order, cols)


def write_report(
    results: Sequence[EvalResult],
    test_set: TestSet,
    report_dir: str | os.PathLike,
    summary: dict[str, Any],
    worst: int = 16,
) -> dict[str, Path]:
    """Write the report directory (see the module doc); returns the files by kind."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    thresholds = summary["thresholds"]
    files: dict[str, Path] = {"metrics": write_json(out / "metrics.json", summary)}
    if len(test_set) == 0:
        return files
    plot_ced(results, out / "ced.png", max(thresholds))
    files["ced"] = out / "ced.png"
    plot_per_landmark(results, out / "per_landmark_nme.png")
    files["per_landmark_plot"] = out / "per_landmark_nme.png"
    files["per_landmark_csv"] = write_per_landmark_csv(results, out / "per_landmark.csv")
    files["per_sample"] = write_per_sample_csv(results, test_set, out / "per_sample.csv")
    used: set[str] = set()
    for r in results:
        name = safe_name(r.label)
        stem, k = name, 1
        while name in used:
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        path = out / f"worst_{name}.png"
        if write_worst_grid(r, test_set, path, worst):
            files[f"worst:{r.label}"] = path
    return files
