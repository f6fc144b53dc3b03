"""``staralign test``: the paper's tables for one or several checkpoints on a test set.

One pass over the faces per checkpoint gives the full set and every subset:
WFLW's six attribute subsets (from the tags), 300W's common / challenge / full
(``test_common.tsv`` + ``test_challenge.tsv``, each face read once), or COFW's
single set.  ``--space crop`` scores as the original ``tester.py`` (normalised crop
coordinates, clamped ground truth); ``--space image`` as its ``evaluate.py``
(predictions mapped back to the photo, the annotation's landmarks unclamped).
Several ``--weights`` are compared side by side: one table, one CED plot, JSON
keyed by run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_test", "run_labels"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``test`` to the ``staralign`` parser."""
    from ..config import AMP_MODES
    from ..definitions import NORMS
    from ..hub import DEFAULT_MODEL, WEIGHTS_HELP
    from .scoring import SPACES

    p = subparsers.add_parser(
        "test", help="evaluate checkpoints on a test set: NME / FR / AUC per subset, CED plots",
        description="Evaluate one or several checkpoints (official .pkl or staralign .safetensors) on a "
                    "test set and print the paper's table: NME, failure rate and AUC for the full set and "
                    "each subset. Several --weights are compared side by side.")
    p.add_argument("--weights", nargs="+", metavar="NAME|FILE",
                   help=f"checkpoint(s) to evaluate, each {WEIGHTS_HELP}; several are compared in one table "
                        f"and one CED plot (default: {DEFAULT_MODEL})")
    p.add_argument("--data-definition", "--data_definition", dest="definition", metavar="D",
                   help="WFLW, 300W, COFW, 300VW or a definition file (default: the first checkpoint's)")
    p.add_argument("--image-dir", "--image_dir", dest="image_dir", metavar="DIR",
                   help="folder the annotation's image paths are relative to (default: the test file's folder)")
    p.add_argument("--annot-dir", "--annot_dir", dest="annot_dir", metavar="DIR",
                   help="folder with test.tsv, or 300W's test_common.tsv + test_challenge.tsv "
                        "(also <DIR>/<definition>/, the original's layout)")
    p.add_argument("--test-file", metavar="FILE",
                   help="annotation file: a path, or a name under --annot-dir (default: see --annot-dir)")
    p.add_argument("--norm", choices=NORMS, default="default",
                   help="NME normalisation (default: the definition's 'default', inter-ocular for WFLW)")
    p.add_argument("--flip-test", action="store_true",
                   help="average each prediction with the mirrored crop's")
    p.add_argument("--space", choices=SPACES, default="crop",
                   help="crop: as the original tester (normalised crop coordinates, clamped ground truth); "
                        "image: original image pixels, as the original evaluate.py")
    p.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                   help="FR/AUC thresholds (default: the definition's, 0.05 for 300W, 0.1 otherwise); "
                        "the first is the headline one")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON here ('-': standard output)")
    p.add_argument("--report-dir", metavar="DIR",
                   help="write metrics.json, CED and per-landmark plots, per-sample CSV and worst faces here")
    p.add_argument("--worst", type=int, default=16, metavar="K", help="faces in the worst-faces grid (default 16)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32, metavar="B",
                   help="faces per loader batch (default 32)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="M",
                   help="faces per network call (default: 16 on a CPU, where moderate calls are faster; "
                        "the whole batch on a GPU; 0: the whole batch)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data loader processes (default: 0 on a CPU, up to 8 beside a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="autocast dtype (default none)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="run the network in NCHW (default NHWC, faster on CPUs and tensor cores)")
    p.add_argument("--ema", action="store_true", help="use a training checkpoint's EMA weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code: trusted files only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_test)


RUN_FILES = ("best", "last", "last_ema")  # checkpoint names the trainer writes in every run folder


def _run_name(path: str) -> str:
    """A checkpoint's run name: the run folder's name for the files the trainer writes
    (``runs/wflw/best.safetensors`` -> ``wflw``, ``.../last.safetensors`` -> ``wflw/last``),
    the file's stem for any other file."""
    p = Path(path)
    if p.stem not in RUN_FILES:
        return p.stem
    folder = p.absolute().parent.name or p.stem
    return folder if p.stem == "best" else f"{folder}/{p.stem}"


def run_labels(paths: list[str]) -> list[str]:
    """Short unique names for the runs: run folder or file names, the folder above added when
    they clash."""
    names = [_run_name(p) for p in paths]
    labels = [n if names.count(n) == 1 else f"{Path(p).absolute().parent.parent.name}/{n}"
              if Path(p).stem in RUN_FILES else f"{Path(p).parent.name}/{n}"
              for p, n in zip(paths, names, strict=True)]
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label}#{k}", k + 1
        out.append(name)
    return out


def _check_args(args: argparse.Namespace) -> None:
    from ..cli import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.micro_batch is not None and args.micro_batch < 0:
        raise UserError(f"--micro-batch must be >= 0, got {args.micro_batch}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.worst < 0:
        raise UserError(f"--worst must be >= 0, got {args.worst}")
    if args.thresholds and any(not (t > 0) for t in args.thresholds):
        raise UserError(f"--thresholds must be positive, got {args.thresholds}")
    if args.annot_dir is None and args.test_file is None:
        raise UserError("give --annot-dir (with test.tsv in it) or --test-file")
    if args.annot_dir is not None and not Path(args.annot_dir).is_dir():
        raise UserError(f"--annot-dir {args.annot_dir}: no such directory")
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise UserError(f"--image-dir {args.image_dir}: no such directory")
    from ..hub import resolve_weights

    # Each a file or a published model's name (fetched into the cache once); none: the default model.
    args.weights = [str(resolve_weights(w)) for w in (args.weights or [None])]


def _load(path: str, definition: Any, args: argparse.Namespace):
    """The network of ``path`` for ``definition``, or a UserError saying why not."""
    from ..cli import UserError
    from ..models import CheckpointError, load_model

    try:
        return load_model(path, ema=args.ema, definition=definition, allow_pickle=args.allow_pickle)
    except CheckpointError as exc:
        if definition is None:
            raise UserError(str(exc)) from exc
        first = exc
    # Say plainly when the checkpoint is for another landmark layout.
    try:
        own = load_model(path, ema=args.ema, allow_pickle=args.allow_pickle).definition
    except CheckpointError:
        raise UserError(str(first)) from first
    if own.num_points != definition.num_points:
        raise UserError(f"{path}: the checkpoint predicts {own.num_points} landmarks ({own.name}), but "
                        f"--data-definition {definition.name} has {definition.num_points}") from first
    raise UserError(str(first)) from first


def _resolve_definition(args: argparse.Namespace):
    from ..cli import UserError
    from ..definitions import DefinitionError, get_definition

    if args.definition is None:
        return None
    try:
        return get_definition(args.definition)
    except DefinitionError as exc:
        raise UserError(f"--data-definition {args.definition}: {exc}") from exc


def _load_test_set(args: argparse.Namespace, definition):
    from ..cli import UserError
    from ..data.annotations import AnnotationError, resolve_image_path
    from ..data.testsets import load_test_set

    try:
        test_set = load_test_set(definition, args.annot_dir, args.image_dir, args.test_file)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    except AnnotationError as exc:
        raise UserError(f"{exc} (does --data-definition {definition.name} match the file?)") from exc
    if test_set.image_dir is None:
        test_set.image_dir = str(Path(test_set.files[0]).parent)
    if not len(test_set):
        raise UserError(f"{', '.join(test_set.files)}: no faces to evaluate")
    # Checked up front: a loader worker's error would arrive as a bare RuntimeError, after minutes.
    missing = [a for a in test_set.annotations if not resolve_image_path(a.image_path, test_set.image_dir).is_file()]
    if missing:
        a = missing[0]
        raise UserError(f"{len(missing)} of {len(test_set)} images not found; the first is "
                        f"{resolve_image_path(a.image_path, test_set.image_dir)} (listed in {a.source}:{a.line}); "
                        "check --image-dir")
    return test_set


def run_test(args: argparse.Namespace) -> int:
    import torch

    from ..cli import UserError
    from ..data.images import ImageReadError
    from ..devices import resolve_device
    from .evaluator import evaluate_model
    from .report import build_summary, format_table, json_text, write_json, write_report

    _check_args(args)
    from .._io import same_file

    if args.json and args.json != "-" and any(same_file(args.json, w) for w in args.weights):
        raise UserError(f"--json {args.json} is one of the --weights files; choose another file name")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--device {args.device}: {exc}") from exc
    definition = _resolve_definition(args)
    labels = run_labels(list(args.weights))
    test_set = None
    results = []
    for k, (path, label) in enumerate(zip(args.weights, labels, strict=True)):
        model = _load(path, definition, args)
        if definition is None:
            definition = model.definition
        if test_set is None:
            test_set = _load_test_set(args, definition)
        print(f"[{k + 1}/{len(labels)}] {label}: {len(test_set)} faces on {device}", file=sys.stderr, flush=True)
        try:
            result = evaluate_model(
                model.to(device), test_set, definition, device, space=args.space, norm=args.norm,
                flip_test=args.flip_test, amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                micro_batch=args.micro_batch, channels_last=args.channels_last, progress=args.progress,
                label=label, checkpoint=str(path))
        except ImageReadError as exc:
            raise UserError(str(exc)) from exc
        results.append(result)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    thresholds = list(dict.fromkeys(args.thresholds or [definition.fr_auc_threshold]))
    summary = build_summary(results, test_set, thresholds,
                            extra={"device": str(device), "amp": args.amp, "batch_size": args.batch_size})
    table = format_table(summary)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        sys.stdout.write(json_text(summary))
    elif args.json:
        write_json(args.json, summary)
    if args.report_dir:
        files = write_report(results, test_set, args.report_dir, summary, worst=args.worst)
        print(f"report: {len(files)} files in {args.report_dir}", file=sys.stderr)
    return 0
