"""``staralign predict`` (landmarks on photos, folders and videos) and ``staralign export`` (ONNX).

``predict`` writes annotated copies under ``--out-dir`` (folders mirrored, videos
as videos with the same frame count and rate) and one JSON file of every face
(``--json``; ``-`` for standard output).  An input that cannot be read is named
on standard error and skipped; the exit status is then 1.  ``.onnx`` weights run
with onnxruntime and never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .._io import WriteError, atomic_write, same_file
from ..hub import DEFAULT_MODEL, WEIGHTS_HELP

__all__ = ["register", "run_export", "run_predict"]

CALIBRATION_CROPS = 64  # synthetic faces the int8 ranges are calibrated on
HELD_OUT_CROPS = 32  # and others it is checked on


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` and ``export`` to the ``staralign`` parser."""
    from .faces import DETECTOR_NAMES

    p = subparsers.add_parser(
        "predict", help="find faces and landmarks in images, folders and videos",
        description="Find faces and their landmarks in images, folders (searched recursively) and "
                    "videos; write annotated copies and/or one JSON file.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image, video or folder")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help=f"{WEIGHTS_HELP}, or an exported .onnx (no torch needed); default: {DEFAULT_MODEL}")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default="yunet",
                   help="face detector: yunet (OpenCV's YuNet, a 229 kB file downloaded once; falls back to "
                        "opencv with a warning when it cannot be had), opencv (Haar cascade, no download), "
                        "none (each image is one cropped face), dlib or mediapipe (if installed)")
    p.add_argument("--detector-model", metavar="FILE",
                   help="YuNet ONNX file to use instead of the cached download (with --detector yunet)")
    p.add_argument("--refine", action="store_true",
                   help="a second network pass per face, re-cropped from the first pass's landmarks "
                        "(about twice the network time)")
    p.add_argument("--box", action="append", metavar="x1,y1,x2,y2",
                   help="face box in pixels, used instead of the detector on every input (repeat for several)")
    p.add_argument("--format", default="native", metavar="native|68",
                   help="landmark layout of the output: the model's own, or 68 (300W points from a WFLW model)")
    p.add_argument("--json", metavar="OUT", help="write every face to this JSON file ('-': standard output)")
    p.add_argument("--out-dir", metavar="DIR", help="write annotated images and videos here")
    p.add_argument("--ambiguity", action="store_true",
                   help="include per-landmark ambiguity (heatmap spread, pixels) in the JSON")
    p.add_argument("--draw-ambiguity", action="store_true",
                   help="draw ambiguity ellipses (1 standard deviation); implies --ambiguity")
    p.add_argument("--draw-indices", action="store_true", help="number the landmarks in the drawings")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="PyTorch device")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code: trusted files only)")
    p.add_argument("--ema", action="store_true", help="use a training checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="faces per network call (default 8)")
    _add_speed_arguments(p)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="PyTorch mixed precision: bf16 runs on CPUs (channels-last, oneDNN) and GPUs, fp16 on GPUs")
    from .video import add_video_arguments

    add_video_arguments(p)  # --smooth, --detect-every
    p.set_defaults(func=run_predict)

    e = subparsers.add_parser(
        "export", help="export a model to ONNX, checked against PyTorch with onnxruntime",
        description="Export to one self-contained .onnx file (landmark definition and input size in its "
                    "metadata) and check it against PyTorch with onnxruntime; exit 1 if they differ.")
    e.add_argument("--weights", metavar="NAME|FILE", help=f"{WEIGHTS_HELP}; default: {DEFAULT_MODEL}")
    e.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    e.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    e.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 18)")
    e.add_argument("--with-ambiguity", action="store_true",
                   help="also output the heatmap covariance and its eigen-decomposition (computed in the graph)")
    e.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; torchscript is faster but deprecated)")
    e.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest landmark difference accepted, normalised units (default 1e-4)")
    e.add_argument("--allow-pickle", action="store_true", help="see 'predict --allow-pickle'")
    e.add_argument("--ema", action="store_true", help="export a training checkpoint's EMA weights")
    e.add_argument("--stacks", type=int, default=None, metavar="K",
                   help="early exit: export only the first K stacks, landmarks from the K-th (default: all)")
    e.add_argument("--quantize", choices=("int8",), default=None,
                   help="write a statically quantised int8 file, checked against float32 on held-out crops")
    e.add_argument("--calibration", metavar="DIR", default=None,
                   help="folder of face crops to calibrate int8 ranges on (default: synthetic faces)")
    e.add_argument("--quant-format", choices=("qdq", "qoperator"), default="qdq",
                   help="int8 graph form: QuantizeLinear/DequantizeLinear pairs (qdq) or QLinearConv (qoperator)")
    e.add_argument("--quant-ops", choices=("body", "conv", "all"), default="body",
                   help="int8 operators: the network body (convolutions and the operators between them; "
                        "the soft-argmax tail stays float32), the convolutions only, or all (costs accuracy)")
    e.add_argument("--keep-heads-fp32", action="store_true",
                   help="keep the last stack's output convolutions in float32 (when int8 costs too much accuracy)")
    e.set_defaults(func=run_export)


def _add_speed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stacks", type=int, default=None, metavar="K",
                   help="early exit: landmarks from the K-th stack, later stacks not run (default: all; "
                        "an .onnx file runs the stacks it was exported with)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the network (default: the cores this process may use, "
                        "from its CPU affinity and cgroup quota)")


# --------------------------------------------------------------------------- predict


def _parse_box(text: str) -> tuple[float, float, float, float]:
    from ..cli import UserError
    from .faces import parse_box

    try:
        return parse_box(text)
    except ValueError as exc:
        raise UserError(f"--box {text!r}: {exc}") from None


class _Outputs:
    """Where annotated copies go: the input's path relative to its folder, made unique."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir, self.used = out_dir, set()
        self.inputs: set[Path] = set()  # resolved input paths: never written over

    def safe(self, target: Path) -> Path:
        """``target``, or another name beside it when it is one of the inputs (said on stderr)."""
        from .._io import avoid_inputs

        chosen = avoid_inputs(target, self.inputs)
        if chosen != target:
            print(f"staralign predict: {target} is an input, not replaced; the annotated copy is {chosen}",
                  file=sys.stderr)
        return chosen

    def path_for(self, relative: Path, suffix: str | None = None) -> Path | None:
        if self.out_dir is None:
            return None
        target = self.out_dir / (relative.with_suffix(suffix) if suffix else relative)
        stem, k = target.with_suffix(""), 1
        while target in self.used:
            target = stem.with_name(f"{stem.name}_{k}").with_suffix(target.suffix)
            k += 1
        self.used.add(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        return self.safe(target)


class _Predictor:
    def __init__(self, args: argparse.Namespace, det: Any, boxes: list | None) -> None:
        self.args, self.det, self.boxes = args, det, boxes
        self.ambiguity = bool(args.ambiguity or args.draw_ambiguity)
        self.layout = det.layout()  # the definition of the faces det.detect gives (det.format)
        self.outputs = _Outputs(Path(args.out_dir) if args.out_dir else None)

    def draw(self, image: Any, faces: list) -> Any:
        from ..viz import PALETTE, draw_landmarks

        for k, face in enumerate(faces):
            draw_landmarks(image, face.landmarks, box=face.box,
                           ambiguity=face.ambiguity if self.args.draw_ambiguity else None,
                           definition=self.layout, indices=self.args.draw_indices, color=PALETTE[k % len(PALETTE)],
                           label=None if face.score is None else f"{face.score:.2f}", copy=False)
        return image

    def faces_json(self, faces: list) -> list[dict]:
        return [f.to_dict(ambiguity=self.ambiguity) for f in faces]

    def images(self, items: list, errors: list, records: list, progress: Any) -> None:
        import cv2

        from .inputs import ImageReadError, load_image

        step = max(1, self.args.batch_size)
        for start in range(0, len(items), step):
            chunk, loaded = items[start:start + step], []
            for item in chunk:
                try:
                    loaded.append((item, load_image(item.path)))
                except ImageReadError as exc:
                    errors.append({"path": str(item.path), "error": exc.reason})
                    progress.update(1)
            if not loaded:
                continue
            found = self.det.detect_batch([im for _, im in loaded], boxes=[self.boxes] * len(loaded),
                                          ambiguity=self.ambiguity, refine=self.args.refine)
            for (item, image), faces in zip(loaded, found, strict=True):
                record: dict[str, Any] = {"path": str(item.path), "type": "image", "width": image.shape[1],
                                          "height": image.shape[0], "faces": self.faces_json(faces)}
                target = self.outputs.path_for(item.relative)
                if target is not None:
                    drawn = self.draw(image, faces)
                    try:  # encoded in memory, then written atomically like every other output
                        ok, encoded = cv2.imencode(target.suffix, drawn)
                    except cv2.error:
                        ok = False
                    if not ok:  # an extension OpenCV cannot write: PNG instead
                        target = self.outputs.safe(target.with_suffix(".png"))
                        ok, encoded = cv2.imencode(".png", drawn)
                        if not ok:
                            raise WriteError(target, "OpenCV could not encode the annotated image")
                    atomic_write(target, encoded.tobytes())
                    record["output"] = str(target)
                records.append(record)
                progress.set_postfix(last=item.path.name)
                progress.update(1)

    def video(self, item: Any, errors: list, records: list) -> None:
        import cv2

        cap = cv2.VideoCapture(str(item.path))
        if not cap.isOpened():
            errors.append({"path": str(item.path), "error": "not a readable video (OpenCV cannot open it)"})
            return
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = float(fps) if fps and fps > 0 and fps < 1000 else 25.0
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        from .inputs import ImageReadError, check_size

        try:
            check_size(width, height, item.path)
        except ImageReadError as exc:
            cap.release()
            errors.append({"path": str(item.path), "error": exc.reason})
            return
        writer, target = None, None
        if self.outputs.out_dir is not None:
            writer, target = self._writer(item, fps, width, height)
            if writer is None:
                cap.release()
                errors.append({"path": str(item.path), "error": "cannot write an annotated video (no codec)"})
                return
        frames: list[dict] = []
        from ..progress import progress
        from .video import tracker_from_args

        frames_said = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))  # -1 or 0 where the container does not say
        bar = progress(frames_said if frames_said > 0 else None, f"predict {item.path.name}", "frame")
        tracker = tracker_from_args(self.det, self.args, self.boxes)  # one per video: ids start at 0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                index = len(frames)
                tracked = tracker.step(frame, t=index / fps)
                frames.append({"index": index, "time": round(index / fps, 4),
                               "faces": [f.to_dict(ambiguity=self.ambiguity) for f in tracked]})
                if writer is not None:
                    writer.write(self.draw(frame, [f.face for f in tracked]))
                bar.update(1)
        finally:
            bar.close()
            cap.release()
            if writer is not None:
                writer.release()
        record: dict[str, Any] = {"path": str(item.path), "type": "video", "width": width, "height": height,
                                  "fps": fps, "frame_count": len(frames), "frames": frames}
        if target is not None:
            record["output"] = str(target)
        records.append(record)

    def _writer(self, item: Any, fps: float, width: int, height: int) -> tuple[Any, Path | None]:
        import cv2

        # MPEG-4 in .mp4 where OpenCV has it; Motion-JPEG in .avi works in every OpenCV build.
        choices = [(".avi", "MJPG")] if item.path.suffix.lower() == ".avi" else [(".mp4", "mp4v"), (".avi", "MJPG")]
        for suffix, codec in choices:
            target = self.outputs.path_for(item.relative, suffix)
            writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
            if writer.isOpened():
                return writer, target
            writer.release()
            target.unlink(missing_ok=True)
        return None, None


def run_predict(args: argparse.Namespace) -> int:
    """``staralign predict``: see the module docstring."""
    from ..cli import UserError
    from ..hub import resolve_weights
    from .detector import LandmarkDetector
    from .faces import FaceDetectorError
    from .inputs import collect_inputs
    from .report import report_header

    boxes = [_parse_box(b) for b in args.box] if args.box else None
    if args.json and args.json != "-" and any(same_file(args.json, p) for p in args.inputs):
        raise UserError(f"--json {args.json} is one of the inputs; choose another file name")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    args.weights = str(resolve_weights(args.weights))  # a name is fetched into the cache once
    for flag, value in (("--stacks", args.stacks), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.detect_every < 1:
        raise UserError(f"--detect-every must be at least 1, got {args.detect_every}")
    items, missing = collect_inputs(args.inputs)
    errors: list[dict[str, str]] = [{"path": p, "error": why} for p, why in missing]
    try:
        face_detector: Any = args.detector
        if args.detector_model:
            if args.detector != "yunet":
                raise UserError(f"--detector-model is a YuNet file; it needs --detector yunet, not {args.detector}")
            from .faces import YuNetDetector

            face_detector = YuNetDetector(args.detector_model)
        det = LandmarkDetector.from_checkpoint(
            args.weights, device=args.device, detector=face_detector, allow_pickle=args.allow_pickle,
            ema=args.ema, format=args.format, batch_size=args.batch_size, stacks=args.stacks,
            threads=args.threads, amp=args.amp)
        if (args.ambiguity or args.draw_ambiguity) and not det.backend.has_ambiguity:
            raise UserError(f"{args.weights} has no ambiguity outputs (an .onnx file exported without "
                            "--with-ambiguity): export it again with 'staralign export --weights CKPT --onnx "
                            f"{args.weights} --with-ambiguity', or leave out --ambiguity/--draw-ambiguity")
        # The header now: fails here, once, if the face detector is unavailable.
        header = report_header(det, str(args.weights), box=boxes is not None)
        predictor = _Predictor(args, det, boxes)
        predictor.outputs.inputs = {i.path.resolve() for i in items}
    except (ValueError, FaceDetectorError, OSError) as exc:
        raise UserError(str(exc)) from exc
    records: list[dict] = []
    images = [i for i in items if i.kind == "image"]
    videos = [i for i in items if i.kind == "video"]
    from ..progress import progress

    with progress(len(images), "predict", "image", enabled=bool(images)) as bar:
        predictor.images(images, errors, records, bar)
    for item in videos:  # each video shows its own frames
        predictor.video(item, errors, records)

    order = {str(i.path): k for k, i in enumerate(items)}
    records.sort(key=lambda r: order.get(r["path"], 0))
    report = {**header, "inputs": records, "errors": errors}
    if args.json == "-":
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    elif args.json:
        atomic_write(args.json, json.dumps(report))
    for err in errors:
        print(f"staralign predict: skipped {err['path']}: {err['error']}", file=sys.stderr)
    n_faces = sum(len(r["faces"]) for r in records if r["type"] == "image")
    n_faces += sum(len(f["faces"]) for r in records if r["type"] == "video" for f in r["frames"])
    print(f"staralign predict: {len(records)} input(s), {n_faces} face(s)"
          + (f", {len(errors)} skipped" if errors else ""), file=sys.stderr)
    return 1 if errors else 0


# --------------------------------------------------------------------------- export


def run_export(args: argparse.Namespace) -> int:
    """``staralign export``: write the ONNX file, check it, say how close it is."""
    from ..cli import UserError
    from ..hub import resolve_weights

    args.weights = str(resolve_weights(args.weights))  # a name is its cached file: compared below
    if same_file(args.onnx, args.weights):
        raise UserError(f"--onnx {args.onnx} is the --weights file; choose another file name")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"ONNX export needs onnx and onnxruntime: pip install 'staralign[onnx]' ({exc})") from exc
    from ..models import load_model
    from .export import DEFAULT_OPSET, export_onnx

    try:
        model = load_model(args.weights, ema=args.ema, allow_pickle=args.allow_pickle)
    except ValueError as exc:  # CheckpointError, DefinitionError
        raise UserError(str(exc)) from exc
    stacks = getattr(args, "stacks", None)
    try:
        model.check_stacks(stacks)
    except ValueError as exc:
        raise UserError(f"--stacks: {exc}") from exc
    quantize = getattr(args, "quantize", None)
    crops = _calibration_crops(args, model) if quantize else None  # a bad --calibration fails before exporting
    out = Path(args.onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="staralign-export-") as tmp:
        # With --quantize the float32 graph is an intermediate: OUT gets only the int8 file.
        fp32_path = Path(tmp) / "fp32.onnx" if quantize else out
        try:
            report = export_onnx(model, fp32_path, dynamic_batch=args.dynamic_batch,
                                 opset=args.opset or DEFAULT_OPSET, with_ambiguity=args.with_ambiguity,
                                 exporter=args.exporter, tolerance=args.tolerance, stacks=stacks)
        except Exception as exc:  # the exporters raise many types; name the model and the cause
            raise UserError(f"{args.weights}: ONNX export failed ({type(exc).__name__}: {exc})") from exc
        moments = "".join(f", {k} {v:.2e}" for k, v in report.moment_differences.items())
        verdict = "OK" if report.passed else "FAILED"
        if not quantize:
            print(f"wrote {out} (opset {report.opset}, {report.exporter} exporter, "
                  f"{'dynamic' if report.dynamic_batch else 'fixed'} batch, outputs: {', '.join(report.outputs)}"
                  f"{'' if stacks is None else f', {stacks} stack(s)'})")
        print(f"onnxruntime vs PyTorch on batch {report.checked_batches}: max landmark difference "
              f"{report.max_difference:.2e} (tolerance {report.tolerance:g}){moments}: {verdict}")
        if not report.passed:
            return 1
        if quantize:
            _quantize(args, fp32_path, out, *crops)
    return 0


def _calibration_crops(args: argparse.Namespace, model: Any) -> tuple[Any, Any, Any, str]:
    """Calibration crops, held-out crops, their exact labels (or None) and a description."""
    from ..cli import UserError
    from .quantize import synthetic_crops

    size = int(model.config.input_size)
    synthetic_labels = model.definition.name.upper() == "WFLW" and model.definition.num_points == 98
    if args.calibration:
        from .quantize import folder_crops

        try:
            crops = folder_crops(args.calibration, size)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        held_count = max(1, len(crops) // 5)  # the last fifth (sorted by name) is held out
        calibration, held_out, labels = crops[:-held_count], crops[-held_count:], None
        source = f"{args.calibration} ({len(crops)} crops, last {held_count} held out)"
    else:
        calibration, _ = synthetic_crops(CALIBRATION_CROPS, size, seed=0)
        held_out, exact = synthetic_crops(HELD_OUT_CROPS, size, seed=1)
        labels = exact if synthetic_labels else None
        source = f"synthetic faces (staralign.data.synth), {CALIBRATION_CROPS} calibration + {HELD_OUT_CROPS} held out"
    return calibration, held_out, labels, source


def _quantize(args: argparse.Namespace, fp32_path: Path, out: Path, calibration: Any, held_out: Any,
              labels: Any, source: str) -> None:
    """``export --quantize int8``: quantise, check on the held-out crops, say what it cost."""
    from ..cli import UserError
    from .quantize import quantize_onnx

    try:
        q = quantize_onnx(fp32_path, out, calibration, held_out, labels=labels, calibration_source=source,
                          quant_format=args.quant_format, keep_heads_fp32=args.keep_heads_fp32,
                          ops=args.quant_ops)
    except Exception as exc:  # onnxruntime.quantization raises many types
        raise UserError(f"{args.weights}: int8 quantisation failed ({type(exc).__name__}: {exc})") from exc
    print(f"wrote {out} (int8, {q.quant_format}, {q.ops_text}, "
          f"per-channel weights, calibrated on {source}"
          f"{', last heads float32' if q.fp32_nodes else ''})")
    truth = ("" if q.nme_fp32 is None else
             f"; NME against exact labels: float32 {q.nme_fp32:.3f}%, int8 {q.nme_int8:.3f}%")
    print(f"int8 vs float32 on {q.held_out_crops} held-out crops: landmark difference max {q.max_px:.3f} px, "
          f"mean {q.mean_px:.3f} px (256 px crop); NME bound {q.nme_bound:.3f} points{truth}")
    if q.warning:
        print(f"warning: {q.warning}")
