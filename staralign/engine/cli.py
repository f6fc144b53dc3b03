"""``staralign train``: build a TrainConfig from a preset, a YAML file and flags, then train.

Precedence: preset (``--preset``, default ``paper``) < ``--config FILE.yaml`` <
individual flags.  The original's underscore spellings (``--image_dir``,
``--annot_dir``, ``--data_definition``, ``--batch_size``) are accepted too.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import (
    AMP_MODES,
    LANDMARK_LOSSES,
    TARGET_PLACEMENTS,
    ConfigError,
    TrainConfig,
    load_preset,
    merge,
)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper", help="starting point: paper (the authors' recipe) or tiny")
    p.add_argument("--config", help="YAML file with any TrainConfig fields (applied over the preset)")
    p.add_argument("--out", help="run directory (config, logs, checkpoints)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR where it stopped (--epochs, --workers, --device, --image-dir, "
                        "--annot-dir, --save-every-steps and --time-budget-minutes may be given anew)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out (its weights, state and logs) instead of refusing")
    g = p.add_argument_group("data")
    g.add_argument("--data-definition", "--data_definition", dest="definition",
                   help="WFLW, 300W, COFW, 300VW, or a landmark definition file")
    g.add_argument("--image-dir", "--image_dir", dest="image_dir",
                   help="folder the image paths in the annotation files are relative to")
    g.add_argument("--annot-dir", "--annot_dir", dest="annot_dir",
                   help="folder with train.tsv / test.tsv (or <definition>/train.tsv as the original)")
    g.add_argument("--train-file", help="training annotation file name (default train.tsv)")
    g.add_argument("--val-file", help="validation annotation file name (default test.tsv)")
    g.add_argument("--workers", type=int, help="data loader processes per training process")
    g.add_argument("--targets", choices=TARGET_PLACEMENTS,
                   help="where point/edge map targets are built: loader workers, mixed (edge maps in the "
                        "workers, point maps on the device), or the device; auto = mixed on CUDA, else worker")
    g.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip malformed annotation rows")
    g = p.add_argument_group("model")
    g.add_argument("--nstack", type=int, help="hourglass stacks (default: the preset's)")
    g.add_argument("--channels", type=int, help="feature channels (default: the preset's)")
    g.add_argument("--input-size", type=int, help="side of the input crop in pixels (default: the preset's)")
    g.add_argument("--no-aam", action="store_true", default=None, help="no point/edge heads")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs to train (default: the preset's)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="per process (per GPU)")
    g.add_argument("--lr", type=float, help="initial learning rate (default: the preset's)")
    g.add_argument("--loss", choices=[k for k in LANDMARK_LOSSES if k != "none"] + ["awing"],
                   help="landmark loss (awing: the AAM maps alone)")
    g.add_argument("--star-w", type=float, help="weight of STAR's eigenvalue penalty (default: the preset's)")
    g.add_argument("--star-dist", choices=["smoothl1", "l1", "l2", "wing"],
                   help="distance STAR applies along each principal direction (default: the preset's)")
    g.add_argument("--no-ema", action="store_true", default=None,
                   help="no exponential moving average of the weights (validated and saved beside the model)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation (default: the preset's)")
    g.add_argument("--amp", choices=AMP_MODES, help="autocast precision (default: the preset's, none)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory format (faster convolutions on CPUs and tensor cores)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the network and the loss")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="capture the whole training step as one CUDA graph (one GPU, amp none or bf16)")
    g.add_argument("--cudnn-benchmark", action="store_true", default=None,
                   help="let cuDNN pick the fastest kernels for the input size")
    g.add_argument("--detect-anomaly", action="store_true", default=None,
                   help="autograd anomaly detection, as the original (slow: for debugging NaNs)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="batch-norm statistics synchronised across processes (torchrun)")
    g.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip (and count) batches with a NaN/Inf loss instead of stopping")
    g.add_argument("--save-every-steps", type=int,
                   help="also save the training state every N steps within an epoch (default: at epoch ends only)")
    g.add_argument("--time-budget-minutes", type=float,
                   help="stop after this many minutes, validated and saved (default: no limit)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Nested TrainConfig overrides from the flags that were given."""
    o: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    if args.definition is not None:
        put("model", "definition", args.definition)
    for k in ("image_dir", "annot_dir", "train_file", "val_file", "workers", "targets", "skip_bad_rows"):
        put("data", k, getattr(args, k))
    for k in ("nstack", "channels", "input_size"):
        put("model", k, getattr(args, k))
    if args.no_aam:
        put("model", "use_aam", False)
    for k in ("epochs", "batch_size", "lr"):
        put("optim", k, getattr(args, k))
    if args.no_ema:
        put("optim", "ema", False)
    if args.loss is not None:
        put("loss", "kind", "none" if args.loss == "awing" else args.loss)
    put("loss", "star_w", args.star_w)
    put("loss", "star_dist", args.star_dist)
    for k in ("device", "seed", "amp", "channels_last", "compile", "cuda_graphs", "cudnn_benchmark", "detect_anomaly",
              "sync_bn", "save_every_steps", "time_budget_minutes"):
        put("runtime", k, getattr(args, k))
    if args.skip_nonfinite:
        put("runtime", "on_nonfinite", "skip")
    return o


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import yaml

    from ..config import from_dict, to_dict

    config = load_preset(args.preset)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{args.config}: cannot read config: {exc}") from exc
        try:
            config = merge(config, data)
        except ConfigError as exc:
            raise ConfigError(f"{args.config}: {exc}") from exc
    config = merge(config, overrides_from_args(args))
    config = from_dict(TrainConfig, to_dict(config))
    config.validate()
    return config


def _flags_given(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> list[str]:
    """The train flags set to something other than their default, as the user spells them."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_arguments(parser)
    return [a.option_strings[0] for a in parser._actions
            if a.dest not in exclude and getattr(args, a.dest, a.default) != a.default]


def run_train(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .trainer import train

    if args.resume:
        from pathlib import Path

        from ..config import load_yaml
        from .resume import RESUMABLE_FLAGS

        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
        # Settings that change the model, the data definition or the loss would make another
        # experiment: refuse them (the run's schedule, folders and machinery may change).
        given = _flags_given(args, exclude=("resume",) + RESUMABLE_FLAGS)
        if given:
            raise UserError(f"--resume continues {run_dir} with its saved config.yaml; remove "
                            f"{', '.join(given)}, which would change the model, data or loss (start a new "
                            "run with --out for that)")
        try:
            config = merge(load_yaml(TrainConfig, run_dir / "config.yaml"), overrides_from_args(args))
            config.validate()
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        out, resume = run_dir, True
    else:
        if not args.out:
            raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        if not config.data.annot_dir:
            raise UserError("--annot-dir is required")
        out, resume = args.out, False
    from ..models.checkpoint import CheckpointError
    from .preflight import PreflightError
    from .rundir import RunDirError, RunFailure

    try:
        result = train(config, out, resume=resume, overwrite=bool(args.overwrite))
    except (ConfigError, RunDirError, PreflightError, CheckpointError) as exc:
        # settings that only the chosen device or launch rules out, a folder in use or holding a
        # run, bad data, a training state that cannot be read
        raise UserError(str(exc)) from exc
    except RunFailure as exc:  # a corrupt image or a full disk mid-run: named, with the last checkpoint
        raise UserError(str(exc)) from exc
    print(f"best NME {result.best_nme:.5f} at epoch {result.best_epoch} ({result.best_source}); "
          f"run directory {result.run_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process, or many with torchrun)",
                       description="Train a model (one process, or many with torchrun).  Settings come from "
                                   "--preset, then --config FILE.yaml over it, then the flags below over both; "
                                   "a flag without a default shown keeps the preset's value.  The run folder "
                                   "(--out) holds the configuration, logs and checkpoints (docs/training.md).")
    _add_train_arguments(p)
    p.set_defaults(func=run_train)
