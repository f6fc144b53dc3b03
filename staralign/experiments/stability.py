"""``staralign experiment stability``: how steady and how prompt each temporal filter is on video.

Synthetic face videos with exact landmarks (:mod:`staralign.data.synth.sequence`)
go through :class:`~staralign.inference.tracking.FaceTracker` with a perfect face
detector (the true dataset box, every ``detect_every`` frames; crops from the
previous landmarks in between).  The network's unfiltered landmarks and heatmap
covariances are recorded once per sequence (``seed_<k>.npz`` in ``--out``, so an
interrupted run resumes), then every filter runs over the same record: the crops
never depend on the filter, so this is exactly what ``predict --smooth`` gives.

Per filter and landmark group:

* ``nme`` -- mean landmark error / inter-ocular distance (outer eye corners), %;
* ``jitter`` -- RMS of (predicted acceleration - true acceleration), the second
  difference per frame, in pixels at a face box of ``REF_FACE`` pixels a side;
* ``lag`` -- the delay d (frames, in quarter frames from -2 to 8) for which the
  truth delayed by d best matches the prediction on the fast frames (the quarter
  of frames where the group moves fastest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FILTERS", "GROUPS", "REF_FACE", "SWEEP", "evaluate_filter", "record_sequence", "run_stability"]

REF_FACE = 200.0  # jitter is in pixels at a face box of this many pixels a side
FILTERS = ("none", "oneeuro", "ambiguity")
# WFLW's landmark groups (the definition's edges; the pupils 96, 97 go with the eyes)
GROUPS: dict[str, tuple[int, ...]] = {
    "jaw": tuple(range(0, 33)),
    "brows": tuple(range(33, 51)),
    "nose": tuple(range(51, 60)),
    "eyes": (*range(60, 76), 96, 97),
    "mouth": tuple(range(76, 96)),
}
GROUPS["all"] = tuple(range(98))
LAGS = np.arange(-2.0, 8.01, 0.25)
# ``--sweep``: the parameter grid tried per filter; the setting with the lowest mean NME (all
# landmarks) over the sweep's seeds is reported (how the defaults in ``smoothing`` were chosen).
SWEEP: dict[str, list[dict[str, float]]] = {
    "oneeuro": [{"min_cutoff": c, "beta": b} for c in (0.25, 0.5, 1.0, 2.0, 4.0) for b in (0.0, 0.5, 2.0, 8.0)],
    "ambiguity": [{"motion": m} for m in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)],
}


def record_sequence(detector: Any, seq: Any, detect_every: int) -> dict[str, np.ndarray]:
    """Unfiltered landmarks (T, N, 2), covariances (T, N, 2, 2), face sizes (T,) and track ids (T,)
    of the sequence's face (NaN / -1 where no track)."""
    from ..crop import landmark_box
    from ..inference.tracking import FaceTracker, box_iou

    t_count, n = seq.landmarks.shape[:2]
    points = np.full((t_count, n, 2), np.nan)
    cov = np.full((t_count, n, 2, 2), np.nan)
    unit = np.full(t_count, np.nan)
    ids = np.full(t_count, -1)
    tracker = FaceTracker(detector, smooth="none", detect_every=detect_every, boxes=[seq.face_boxes[0]])
    for i, frame in enumerate(seq.frames):
        tracker.boxes = [tuple(seq.face_boxes[i])]  # the perfect detector: this frame's true box
        tracked = tracker.step(frame, t=i / seq.fps)
        if not tracked:
            continue
        # the track on the true face (a drifted track may live on until the detector misses it twice)
        best = max(tracked, key=lambda f: box_iou(landmark_box(f.raw.landmarks), landmark_box(seq.landmarks[i])))
        face = best.raw
        points[i], unit[i], ids[i] = face.landmarks, face.scale * 200.0, best.track_id
        if face.ambiguity is not None:
            cov[i] = face.ambiguity.covariance
    return {"points": points, "cov": cov, "unit": unit, "ids": ids}


def apply_filter(name: str, record: dict[str, np.ndarray], fps: float, **options: float) -> np.ndarray:
    """The filter ``name`` run over a recorded sequence (restarted when the track changes)."""
    from ..inference.smoothing import make_filter

    out = np.full_like(record["points"], np.nan)
    filt, last_id = None, -1
    for i, (p, c, u, k) in enumerate(zip(record["points"], record["cov"], record["unit"], record["ids"], strict=True)):
        if k < 0:
            filt, last_id = None, -1
            continue
        if filt is None or k != last_id:
            filt, last_id = make_filter(name, **options), int(k)
        out[i] = filt.update(p, None if not np.isfinite(c).all() else c, i / fps, float(u))[0]
    return out


def _lag(pred: np.ndarray, truth: np.ndarray, fast: np.ndarray) -> float:
    """Delay (frames) of the truth that best matches the prediction on the ``fast`` frames."""
    t = np.arange(len(truth), dtype=np.float64)
    frames = np.flatnonzero(fast & (t >= LAGS.max()) & np.isfinite(pred).all(axis=(1, 2)))
    if len(frames) == 0:
        return float("nan")
    errors = []
    for d in LAGS:
        src = frames - d
        lo = np.clip(np.floor(src).astype(int), 0, len(truth) - 1)
        hi = np.clip(lo + 1, 0, len(truth) - 1)
        w = (src - lo)[:, None, None]
        shifted = truth[lo] * (1 - w) + truth[hi] * w
        errors.append(np.mean(np.linalg.norm(pred[frames] - shifted, axis=-1)))
    return float(LAGS[int(np.argmin(errors))])


def evaluate_filter(pred: np.ndarray, seq: Any) -> dict[str, dict[str, float]]:
    """NME (%), jitter (px at REF_FACE) and lag (frames) of (T, 98, 2) predictions, per group."""
    truth, iod = seq.labels, seq.iod  # the exact landmarks unless label_noise > 0
    side = seq.face_boxes[:, 2] - seq.face_boxes[:, 0]
    out: dict[str, dict[str, float]] = {}
    for group, idx in GROUPS.items():
        p, g = pred[:, idx], truth[:, idx]
        ok = np.isfinite(p).all(axis=(1, 2))
        err = np.linalg.norm(p - g, axis=-1).mean(axis=1) / iod
        acc_p = p[2:] - 2 * p[1:-1] + p[:-2]
        acc_g = g[2:] - 2 * g[1:-1] + g[:-2]
        ok3 = ok[2:] & ok[1:-1] & ok[:-2]
        jit = np.linalg.norm(acc_p - acc_g, axis=-1) * (REF_FACE / side[1:-1, None])
        speed = np.r_[0.0, np.linalg.norm(np.diff(g.mean(axis=1), axis=0), axis=-1)]
        fast = speed >= np.percentile(speed[1:], 75)
        out[group] = {
            "nme": float(100 * err[ok].mean()) if ok.any() else float("nan"),
            "jitter": float(np.sqrt(np.mean(jit[ok3] ** 2))) if ok3.any() else float("nan"),
            "lag": _lag(p, g, fast),
        }
    out["all"]["tracked_frames"] = float(np.isfinite(pred).all(axis=(1, 2)).mean())
    return out


def run_stability(weights: str, out: str | Path, seeds: int = 3, frames: int = 60, size: int = 256,
                  fps: float = 30.0, detect_every: int = 10, label_noise: float = 0.0, device: str = "cpu",
                  filters: tuple[str, ...] = FILTERS, first_seed: int = 0,
                  filter_options: dict[str, dict[str, float]] | None = None, do_sweep: bool = False) -> dict[str, Any]:
    """Run the experiment; write ``stability.json`` and ``stability.md`` in ``out``; return the results.

    ``filter_options``: per filter name, options for ``make_filter`` (default: its defaults);
    ``do_sweep``: try every setting in :data:`SWEEP` and use the best (lowest NME) instead.
    """
    import hashlib

    from .._io import atomic_path, atomic_write
    from ..data.synth.sequence import synth_sequence
    from ..inference.detector import LandmarkDetector

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    det = LandmarkDetector.from_checkpoint(weights, device=device, detector="none")
    if det.definition.num_points != 98:
        raise ValueError(f"{weights}: the stability experiment needs a 98-point (WFLW) model, "
                         f"got {det.definition.num_points} points")
    info = Path(weights).resolve().stat()
    model_tag = hashlib.sha256(f"{Path(weights).resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:10]
    seqs, records = [], []
    for seed in range(first_seed, first_seed + seeds):
        seq = synth_sequence(seed, frames=frames, size=size, fps=fps, label_noise=label_noise)
        # The record holds this model's predictions: its name carries the weights' fingerprint, so
        # another model run into the same folder records its own instead of reading these.
        cache = out / f"seed_{seed}_{frames}f_{size}px_every{detect_every}_{model_tag}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                record = {k: z[k] for k in z.files}
        else:
            record = record_sequence(det, seq, detect_every)
            with atomic_path(cache) as tmp, open(tmp, "wb") as fh:  # a file object: savez adds no suffix
                np.savez(fh, **record)
        seqs.append(seq)
        records.append(record)
    options = dict(filter_options or {})
    sweep: dict[str, Any] = {}
    if do_sweep:
        for name, grid in SWEEP.items():
            if name not in filters:
                continue
            alls = [[evaluate_filter(apply_filter(name, r, fps, **o), q)["all"]
                     for r, q in zip(records, seqs, strict=True)] for o in grid]
            scores = [float(np.mean([a["nme"] for a in runs])) for runs in alls]
            sweep[name] = {"grid": grid, "nme": scores, "best": grid[int(np.argmin(scores))],
                           "jitter": [float(np.mean([a["jitter"] for a in runs])) for runs in alls],
                           "lag": [float(np.mean([a["lag"] for a in runs])) for runs in alls]}
            options[name] = sweep[name]["best"]
    per_seed = [{name: evaluate_filter(apply_filter(name, r, fps, **options.get(name, {})), q) for name in filters}
                for r, q in zip(records, seqs, strict=True)]
    summary: dict[str, Any] = {}
    for name in filters:
        summary[name] = {}
        for group in GROUPS:
            summary[name][group] = {}
            for metric in ("nme", "jitter", "lag"):
                vals = np.array([s[name][group][metric] for s in per_seed], np.float64)
                known = vals[np.isfinite(vals)]  # lag is undefined on videos too short to have fast motion
                summary[name][group][metric] = {
                    "mean": float(known.mean()) if known.size else None,
                    "std": float(known.std()) if known.size else None,
                    "seeds": [float(v) if np.isfinite(v) else None for v in vals]}
    result = {"weights": str(weights), "seeds": list(range(first_seed, first_seed + seeds)), "frames": frames,
              "size": size, "fps": fps, "detect_every": detect_every, "label_noise": label_noise,
              "ref_face_px": REF_FACE, "filter_options": options, "sweep": sweep, "summary": summary,
              "per_seed": per_seed}
    atomic_write(out / "stability.json", json.dumps(result, indent=1))
    atomic_write(out / "stability.md", format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per filter and group, mean +- std over seeds."""
    opts = "; ".join(f"{k}: {', '.join(f'{a}={b:g}' for a, b in v.items())}"
                     for k, v in result["filter_options"].items()) or "defaults"
    lines = [f"seeds {result['seeds'][0]}..{result['seeds'][-1]}, {result['frames']} frames each at "
             f"{result['fps']:g} fps, {result['size']} px frames, detection every {result['detect_every']} frames; "
             f"jitter in px at a {result['ref_face_px']:g}-px face box; lag in frames (fast quarter of frames); "
             f"filter settings: {opts}.", "",
             "| filter | group | NME % | jitter px | lag frames |", "|---|---|---|---|---|"]
    def cell(m: dict[str, Any]) -> str:
        return "-" if m["mean"] is None else f"{m['mean']:.2f} ± {m['std']:.2f}"

    for name, groups in result["summary"].items():
        for group, m in groups.items():
            lines.append(f"| {name} | {group} | {cell(m['nme'])} | {cell(m['jitter'])} | {cell(m['lag'])} |")
    return "\n".join(lines) + "\n"
