"""``staralign train``: build a TrainConfig from a preset, a YAML file and flags, then train.

Precedence: preset (``--preset``, default ``paper``) < ``--config FILE.yaml`` <
individual flags.  The configuration flags are generated from the TrainConfig fields
(:mod:`staralign.config_flags`): a field's declaration in :mod:`staralign.config` is the
one place its flag, help and choices are written, the original's underscore spellings
(``--image_dir``, ``--annot_dir``, ``--data_definition``, ``--batch_size``) included.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import ConfigError, TrainConfig, load_preset, merge, nested
from ..config_flags import add_config_flags, config_flags, overrides_from_flags


def _resumable_paths() -> set[str]:
    """The dotted names of the fields a resume may change (:data:`.resume.RESUMABLE`)."""
    from .resume import RESUMABLE

    return {f"{section}.{key}" for section, key in RESUMABLE}


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    resumable = [item.names[0] for item in config_flags(TrainConfig) if item.path in _resumable_paths()]
    p.add_argument("--preset", default="paper", help="starting point: paper (the authors' recipe) or tiny")
    p.add_argument("--config", help="YAML file with any TrainConfig fields (applied over the preset)")
    p.add_argument("--out", help="run directory (config, logs, checkpoints)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help=f"continue the run in RUN_DIR where it stopped ({', '.join(resumable[:-1])} and "
                        f"{resumable[-1]} may be given anew)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out (its weights, state and logs) instead of refusing")
    add_config_flags(p, TrainConfig)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig overrides by dotted name (``{"optim.lr": 0.01}``) from the flags that were given."""
    return overrides_from_flags(args, TrainConfig)


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
    config = merge(config, nested(overrides_from_args(args)))
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

        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
        # Settings that change the model, the data definition or the loss would make another
        # experiment: refuse them (the run's schedule, folders and machinery may change).
        given = _flags_given(args, exclude=("resume", *_resumable_paths()))
        if given:
            raise UserError(f"--resume continues {run_dir} with its saved config.yaml; remove "
                            f"{', '.join(given)}, which would change the model, data or loss (start a new "
                            "run with --out for that)")
        try:
            saved = load_yaml(TrainConfig, run_dir / "config.yaml")  # read once, here; train() takes it
            config = merge(saved, nested(overrides_from_args(args)))
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
        out, resume, saved = args.out, False, None
    from ..models.checkpoint import CheckpointError
    from .preflight import PreflightError
    from .rundir import RunDirError, RunFailure

    try:
        result = train(config, out, resume=resume, overwrite=bool(args.overwrite), saved=saved)
    except (ConfigError, RunDirError, PreflightError, CheckpointError) as exc:
        # settings that only the chosen device or launch rules out, a folder in use or holding a
        # run, bad data, a training state that cannot be read
        raise UserError(str(exc)) from exc
    except RunFailure as exc:  # a corrupt image or a full disk mid-run: named, with the last checkpoint
        raise UserError(str(exc)) from exc
    print(f"best NME {result.best_nme:.5f} at epoch {result.best_epoch} ({result.best_source}); "
          f"run directory {result.run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``staralign`` parser."""
    p = sub.add_parser("train", help="train a model (one process, or many with torchrun)",
                       description="Train a model (one process, or many with torchrun).  Settings come from "
                                   "--preset, then --config FILE.yaml over it, then the flags below over both; "
                                   "a flag without a default shown keeps the preset's value.  Each group of "
                                   "flags is a section of the configuration and each flag one of its fields "
                                   "(--lr sets optim.lr).  The run folder (--out) holds the configuration, logs "
                                   "and checkpoints (docs/training.md).")
    _add_train_arguments(p)
    p.set_defaults(func=run_train)
