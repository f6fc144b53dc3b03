"""Command-line flags generated from the configuration dataclasses: choices and help from the
fields, overrides by dotted name, errors naming the dotted path, ``--loss awing`` meaning the
AWing map terms alone (and refused where there are none), ``--resume`` reading config.yaml once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from staralign.cli import main
from staralign.config import (
    ConfigError,
    DataConfig,
    Flag,
    RuntimeConfig,
    TrainConfig,
    field_choices,
    load_preset,
    merge,
    nested,
    save_yaml,
    setting,
)
from staralign.config_flags import add_config_flags, config_flags, overrides_from_flags


@dataclasses.dataclass
class Paint:
    """Paint to use."""

    colour: Literal["red", "green", "blue"] = setting("red", "the colour", flag=True)
    coats: int = setting(1, "how many coats", flag=Flag(("--coats", "--layers")))
    finish: Literal["matt", "gloss"] = setting("matt", "the finish", flag=Flag(spellings=(("shiny", "gloss"),)))
    dry: bool = setting(True, "let it dry", flag=Flag(("--wet",), const=False, help="paint over wet paint"))
    brand: str = setting("any", "no flag for this one")


@dataclasses.dataclass
class Job:
    paint: Paint = dataclasses.field(default_factory=Paint)


def _parser(cls: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_flags(p, cls)
    return p


def test_a_field_with_choices_gives_a_flag_with_those_choices_and_the_fields_help():
    actions = {a.option_strings[0]: a for a in _parser(Job)._actions if a.option_strings}
    assert tuple(actions["--colour"].choices) == ("red", "green", "blue") == field_choices(Paint, "colour")
    assert actions["--colour"].help == "the colour" and actions["--colour"].dest == "paint.colour"
    assert tuple(actions["--finish"].choices) == ("matt", "shiny")  # the spelling in place of its value
    assert actions["--coats"].option_strings == ["--coats", "--layers"] and actions["--coats"].type is int
    assert actions["--wet"].help == "paint over wet paint"
    assert "--brand" not in actions  # only fields that declare a flag get one
    with pytest.raises(SystemExit):
        _parser(Job).parse_args(["--colour", "purple"])
    # The real command: its choices are the config fields' own.
    train = {a.option_strings[0]: a for a in _train_parser()._actions if a.option_strings}
    assert tuple(train["--targets"].choices) == field_choices(DataConfig, "targets")
    assert tuple(train["--amp"].choices) == field_choices(RuntimeConfig, "amp")


def test_flags_given_become_overrides_by_dotted_name():
    args = _parser(Job).parse_args(["--layers", "3", "--finish", "shiny", "--wet"])
    assert overrides_from_flags(args, Job) == {"paint.coats": 3, "paint.finish": "gloss", "paint.dry": False}
    assert overrides_from_flags(_parser(Job).parse_args([]), Job) == {}  # not given: nothing overridden
    job = merge(Job(), nested(overrides_from_flags(args, Job)))
    assert (job.paint.coats, job.paint.finish, job.paint.dry, job.paint.colour) == (3, "gloss", False, "red")


def test_an_override_by_dotted_name_sets_that_field_and_errors_name_the_path():
    config = load_preset("tiny")
    assert nested({"optim.lr": 0.5, "optim.epochs": 2, "seed": 1}) == {"optim": {"lr": 0.5, "epochs": 2}, "seed": 1}
    changed = merge(config, nested({"optim.lr": 0.5, "runtime.seed": 3, "loss": {"star_w": 2.0}}))
    assert (changed.optim.lr, changed.runtime.seed, changed.loss.star_w) == (0.5, 3, 2.0)
    assert changed.optim.epochs == config.optim.epochs and changed.model == config.model
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key"):
        merge(config, nested({"optim.lrr": 0.5}))
    with pytest.raises(ConfigError, match=r"^optim\.epochs: expected an integer"):
        merge(config, nested({"optim.epochs": "many"}))
    with pytest.raises(ConfigError, match=r"^data\.targets: must be one of auto, worker, mixed, device, got 'gpu'"):
        merge(config, nested({"data.targets": "gpu"})).validate()
    # Through the command line: the flag's value reaches the field of that dotted name.
    from staralign.engine.cli import config_from_args

    args = _train_parser().parse_args(["--preset", "tiny", "--lr", "0.125", "--skip-nonfinite"])
    assert overrides_from_flags(args, TrainConfig) == {"optim.lr": 0.125, "runtime.on_nonfinite": "skip"}
    via_cli = config_from_args(args)
    assert (via_cli.optim.lr, via_cli.runtime.on_nonfinite) == (0.125, "skip")


def _train_parser() -> argparse.ArgumentParser:
    from staralign.engine.cli import _add_train_arguments

    p = argparse.ArgumentParser()
    _add_train_arguments(p)
    return p


def test_every_train_flag_sets_the_field_it_is_declared_on():
    base = TrainConfig()
    flags = list(config_flags(TrainConfig))
    assert len(flags) >= 30
    for item in flags:
        owner = item.path.split(".")
        old = getattr(getattr(base, owner[0]), owner[1])
        if not item.flag.takes_value or item.type is bool:
            argv, want = [item.names[0]], (True if item.flag.takes_value else item.flag.const)
        elif item.choices:
            word = next(c for c in reversed(item.choices) if item.value(c) != old)
            argv, want = [item.names[0], word], item.value(word)
        else:
            value = {int: 7, float: 0.25}.get(item.type, "x")
            argv, want = [item.names[0], str(value)], value
        args = _train_parser().parse_args(argv)
        config = merge(base, nested(overrides_from_flags(args, TrainConfig)))
        assert getattr(getattr(config, owner[0]), owner[1]) == want != old, (item.path, argv)
        assert item.help and len(item.help.split()) >= 2, item.path


def test_loss_awing_trains_the_awing_map_terms_alone():
    from types import SimpleNamespace

    import torch

    from staralign.engine.cli import config_from_args
    from staralign.losses import AWingLoss
    from staralign.losses.recipe import RecipeLoss

    config = config_from_args(_train_parser().parse_args(["--preset", "tiny", "--loss", "awing"]))
    assert config.loss.kind == "none" and config.loss.map_weight > 0 and config.model.use_aam
    loss = RecipeLoss(config.loss)
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 8, 8, generator=g) for _ in range(4)]
    output = SimpleNamespace(heatmaps=(torch.rand(2, 5, 8, 8, generator=g),), pointmaps=(maps[0],),
                             edgemaps=(maps[1],))
    total, parts = loss(output, torch.rand(2, 5, 2, generator=g), pointmaps=maps[2], edgemaps=maps[3])
    assert set(parts) == {"pointmap/0", "edgemap/0"}  # no landmark term
    awing = AWingLoss()
    want = config.loss.map_weight * (awing(maps[0], maps[2]) + awing(maps[1], maps[3]))
    assert torch.allclose(total, want)


def test_loss_awing_without_the_maps_is_refused_naming_the_fields(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    out = ["--preset", "tiny", "--annot-dir", str(data), "--out", str(tmp_path / "run")]
    assert main(["train", *out, "--loss", "awing", "--no-aam"]) == 2
    err = capsys.readouterr().err
    assert "loss.kind" in err and "model.use_aam" in err and "--loss awing" in err
    cfg = tmp_path / "no_maps.yaml"
    cfg.write_text("loss:\n  map_weight: 0\n")
    assert main(["train", *out, "--config", str(cfg), "--loss", "awing"]) == 2
    err = capsys.readouterr().err
    assert "map_weight 0" in err and "--loss awing" in err
    assert not (tmp_path / "run").exists()


def test_resume_reads_the_runs_config_once(tmp_path, monkeypatch, capsys):
    from .test_engine import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    # A run whose data has gone: the resume stops at the data check, after every config read.
    save_yaml(tiny_config(tmp_path / "gone", runtime={"tensorboard": False}), run / "config.yaml")
    reads = []
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "config.yaml":
            reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "gone" in capsys.readouterr().err  # it got as far as the data check
    assert len(reads) == 1
